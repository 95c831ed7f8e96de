// Request state machine and per-step planning for two models over one block table: the rules of
// docs/method.md ('The R-Stitch rule' and the sections after it), planned as in docs/design.md
// ('Scheduler: plan and commit').
//
// Each step the scheduler plans one SLM sub-batch and one LLM sub-batch: per row a span of new tokens
// [start, end) over which that model extends its KV cache (1 token: a decode), and the logits rows it must
// decide on. Results come back per logits row (token, entropy, flags) and `commit` applies the rules.
//
// Planning may run one step ahead of the results ("overlap", max_inflight = 2): a row is then dispatched
// optimistically on its current model, assuming its in-flight token is kept. When the result says
// otherwise (an SLM token discarded, an LLM hand-back, a stop), the row's later in-flight dispatches are
// marked stale, their results ignored, and each model's filled length is clipped back to the committed
// sequence. Every state change that shortens the sequence goes through `rollback`, which keeps the
// invariant: KV of model m at positions < filled[m] was computed from the committed tokens.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_manager.h"
#include "plan_layout.h"

namespace rstitch {

enum Model : int32_t { kSLM = 0, kLLM = 1 };
enum class Phase : int32_t { kWaiting, kRunning, kFinished };
enum class Finish : int32_t { kNone = 0, kStop = 1, kLength = 2, kAbort = 3, kError = 4 };
enum class Kind : int32_t { kChunk, kStitch, kDraft, kVerify };

constexpr float kInf = std::numeric_limits<float>::infinity();

struct SchedulerConfig {
  int32_t num_blocks = 0;
  int32_t block_size = 16;
  int32_t max_num_seqs = 64;      // sequence slots: rows of the device token and block tables
  int32_t max_model_len = 4096;
  int32_t max_step_tokens = 2048;  // new tokens per model per step
  int32_t max_logits_rows = 256;   // logits rows per model per step
  std::array<bool, 2> has_model{false, true};
  int32_t vocab_size = 0;          // prompt token ids must be below this
  int32_t max_inflight = 1;        // 2: plan step t+1 before step t's results are committed
  bool optimistic_llm = true;      // with overlap: dispatch an LLM row again before its hand-back is known
  int32_t watermark_blocks = 0;    // blocks kept free at admission while others run
  // Parking (docs/method.md, 'Scheduling the LLM under load'): LLM rows wait until max(llm_min_batch,
  // ceil(llm_batch_share * live requests that could need the LLM)) of them are ready, or one has waited
  // `llm_max_wait` steps (llm_min_batch 1 and llm_batch_share 0: no parking). Rows never wait for a batch
  // that cannot form, nor when nothing else would run in the step (no other row is dispatchable).
  int32_t llm_min_batch = 1;
  float llm_batch_share = 0.f;
  int32_t llm_max_wait = 0;
  bool prefix_caching = false;     // share the KV of equal prompt prefixes (block_manager.h)
};

struct RequestSpec {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  int32_t max_tokens = 16;
  int32_t min_tokens = 0;
  std::vector<int32_t> stop_ids;  // EOS ids (unless ignored) and the caller's stop token ids
  // sampling
  float temperature = 0.f;
  float top_p = 1.f;
  int32_t top_k = 0;
  int32_t seed = 0;
  // policy
  int32_t start_model = kSLM;
  float tau_up = kInf;             // SLM: H > tau_up discards and switches to the LLM
  float tau_down = -kInf;          // LLM: H <= tau_down hands back to the SLM
  int32_t handover_after = 0;      // > 0: the LLM hands back after exactly this many tokens
  int32_t min_llm_run = 0;         // > 1: the LLM keeps control for at least this many tokens
  std::vector<uint8_t> forced;     // forced[i]: model that produces output token i (overrides entropy)
  bool use_router = false;         // R-Stitch+: the router decides SLM rows with H > tau_up
  int32_t spec_k = 0;              // > 0: speculative decoding, SLM drafts k, LLM verifies k + 1
  float accept_rate = -1.f;        // benchmarks: accept drafts with this probability instead of verifying
  // cache
  bool skip_prefix_cache = false;  // neither reuse cached KV nor offer this request's own (block_manager.h)
};

struct Stats {
  int64_t slm_tokens = 0, llm_tokens = 0;
  int64_t switches_to_llm = 0, switches_to_slm = 0, discarded_slm_tokens = 0;
  int64_t extend_tokens_slm = 0, extend_tokens_llm = 0;
  int64_t drafted = 0, accepted = 0, verify_steps = 0;
  int64_t preemptions = 0, stale_rows = 0;
  int64_t llm_wait_steps = 0;  // steps this request's LLM row was parked
  double time_slm_s = 0.0, time_llm_s = 0.0;
  double llm_wait_s = 0.0;     // the time of those steps
  // prefix caching: tokens looked up at admission, and per model those whose KV came from the cache
  int64_t prefix_queries = 0;
  std::array<int64_t, 2> prefix_hits{0, 0};
};

struct Dispatch {
  int64_t step;
  int32_t model;
  Kind kind;
  int32_t start, end;  // the span of positions fed
  bool stale = false;
};

// One forward of one model for one request, as the latency estimator needs it.
struct TraceEntry {
  int32_t model;
  int32_t new_tokens;     // N_inf: 1 for a decode, more for an extend
  int32_t cached_tokens;  // N_kv: KV already in the cache
};

struct Request {
  RequestSpec spec;
  Phase phase = Phase::kWaiting;
  Finish finish = Finish::kNone;
  std::string error;
  int32_t n_prompt = 0;
  std::vector<int32_t> tokens;  // prompt + committed output
  std::vector<uint8_t> sources;  // per output token: 0 SLM, 1 LLM
  std::vector<float> entropies;
  std::vector<int32_t> routed;   // output indices the R-Stitch+ router decided (SLM H > tau_up)
  int32_t active = kSLM;
  bool started = false;                 // admitted to running at least once
  std::array<int32_t, 2> filled{0, 0};  // KV length per model once the dispatched steps have run
  int32_t vlen = 0;                     // sequence length once in-flight tokens are kept
  int32_t llm_run = 0, vllm_run = 0;    // tokens of the LLM's current run: committed / with in-flight
  int32_t last_llm_out = -1;            // output index of the last LLM token
  std::vector<std::pair<int32_t, float>> drafts;  // speculative drafts committed so far (token, entropy)
  int32_t drafts_dispatched = 0;
  bool awaiting = false;                // the next dispatch needs the in-flight results first
  int32_t parked_steps = 0;             // steps this row has waited for an LLM batch to form
  int32_t seq_slot = -1;
  BlockTable table;
  int32_t num_hashed = 0;               // leading table blocks hashed (full, committed): prefix caching
  size_t table_synced = 0;              // leading table entries already on the device
  std::deque<Dispatch> inflight;
  std::vector<TraceEntry> trace;        // committed dispatches, in order (stale ones excluded)
  Stats stats;

  int32_t n_out() const { return static_cast<int32_t>(tokens.size()) - n_prompt; }
};

// What a commit reports per request that emitted tokens or finished.
struct Event {
  int64_t id;
  std::vector<int32_t> new_tokens;
  std::vector<int32_t> new_sources;
  std::vector<float> new_entropies;
  Finish finish;
};

struct PlanBuffers {
  int32_t* i32 = nullptr;
  float* f32 = nullptr;
};

struct Results {
  const int32_t* tokens = nullptr;
  const float* entropies = nullptr;
  const int32_t* flags = nullptr;
  int64_t size = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& cfg);

  const SchedulerConfig& config() const { return cfg_; }
  // The parking rule's settings (SchedulerConfig), changeable between steps: they change which rows share a step, not the rules that decide tokens.
  void set_parking(int32_t llm_min_batch, float llm_batch_share, int32_t llm_max_wait);
  const PlanLayout& layout() const { return layout_; }
  const TableUpdateLayout& table_layout() const { return table_layout_; }
  int32_t max_blocks_per_seq() const { return max_blocks_per_seq_; }
  const BlockManager& blocks() const { return blocks_; }

  // Returns "" when accepted, else why the request was refused (it is then not queued).
  std::string add(const RequestSpec& spec);
  void finish(int64_t id, Finish why, const std::string& error = "");
  // Forgets the cached prefixes (after a step that failed to run, whose KV the cache must not trust);
  // false while requests run.
  bool reset_prefix_cache();
  bool has_unfinished() const { return !waiting_.empty() || !running_.empty(); }
  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }

  // Plans step `step` into the given buffers; returns the number of rows planned over both models.
  int32_t plan(int64_t step, std::array<PlanBuffers, 2> bufs, int32_t* table_updates);
  // Applies the results of step `step` (per model, in logits-row order); `seconds` is each model's
  // forward time in that step, attributed to every request that ran on it.
  std::vector<Event> commit(int64_t step, std::array<Results, 2> results, std::array<double, 2> seconds);

  const Request& request(int64_t id) const;
  void release(int64_t id);  // forgets a finished request
  std::vector<int64_t> take_finished();
  // Requests admitted to running for the first time since the last call (queue-time metrics).
  std::vector<int64_t> take_started();

  int64_t llm_steps() const { return llm_steps_; }          // planned steps with LLM rows
  int64_t llm_step_rows() const { return llm_step_rows_; }  // LLM rows over those steps

 private:
  struct RowRef {
    int64_t id;
    int32_t num_logits;
  };
  struct StepRecord {
    std::array<std::vector<RowRef>, 2> rows;
    std::vector<int64_t> parked;  // requests whose LLM row waited in this step
  };
  struct SubBatch {  // a model's plan being written
    int32_t* i32;
    float* f32;
    int32_t rows = 0, tokens = 0, logits = 0;
  };

  bool dispatchable(const Request& r) const;
  bool park_llm_rows() const;  // true: hold this step's LLM rows back so that a larger LLM batch forms
  // Plans r's next dispatch; false when it does not fit this step.
  bool schedule(Request& r, int64_t step, std::array<SubBatch, 2>& sub, StepRecord& rec);
  // Covers r's table up to num_tokens, preempting newer requests if needed; false if r itself was preempted.
  bool make_room(Request& r, int64_t num_tokens);
  void preempt(Request& r);
  // Admits r if the blocks it needs beyond its cached prefix are free (keeping `reserve` free); false if not.
  bool admit(Request& r, int64_t step, std::array<SubBatch, 2>& sub, StepRecord& rec, int32_t reserve);
  // Whether r takes part in prefix caching: the engine caches and r's spec does not opt out.
  bool caches(const Request& r) const { return cfg_.prefix_caching && !r.spec.skip_prefix_cache; }
  // Prefix caching: hashes r's full committed blocks, and moves r's filled lengths past cached KV.
  void hash_committed(Request& r);
  void reuse_cached_kv(Request& r);
  void write_row(Request& r, SubBatch& sb, int32_t model, Kind kind, int32_t start, int32_t end,
                 int32_t num_logits);
  void apply(Request& r, const Dispatch& d, const Results& res, int64_t row, std::vector<Event>& events);
  bool emit(Request& r, int32_t token, int32_t source, float entropy, Event& ev);
  void rollback(Request& r);
  void fail_nonfinite(Request& r, const std::string& why);
  void end(Request& r, Finish why, const std::string& error = "");
  float tau_up(const Request& r, int32_t out_index) const;
  float tau_down(const Request& r, int32_t out_index) const;
  Request& get(int64_t id);

  SchedulerConfig cfg_;
  PlanLayout layout_;
  TableUpdateLayout table_layout_;
  int32_t max_blocks_per_seq_;
  BlockManager blocks_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // admission order
  std::vector<int32_t> free_slots_;
  std::unordered_map<int64_t, StepRecord> steps_;
  std::vector<int64_t> finished_;
  std::vector<int64_t> started_;
  int32_t* table_updates_ = nullptr;
  int64_t num_table_updates_ = 0;
  int64_t llm_steps_ = 0, llm_step_rows_ = 0;
  int64_t current_step_ = -1;
};

}  // namespace rstitch
