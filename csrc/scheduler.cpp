#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace rstitch {

namespace {

const char* model_name(int32_t m) { return m == kSLM ? "SLM" : "LLM"; }

// What a request runs next: model m feeds positions [start, end) and decides the last `num_logits` of
// them (each logits row predicts the token after its input).
struct Next {
  int32_t model;
  Kind kind;
  int32_t start, end, num_logits;
};

Next next_dispatch(const Request& r, int32_t max_model_len);

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& cfg)
    : cfg_(cfg),
      layout_(cfg.max_step_tokens, std::min(cfg.max_num_seqs, cfg.max_step_tokens), cfg.max_logits_rows),
      table_layout_(static_cast<int64_t>(cfg.max_num_seqs) *
                    ((cfg.max_model_len + cfg.block_size - 1) / std::max(cfg.block_size, 1))),
      max_blocks_per_seq_((cfg.max_model_len + cfg.block_size - 1) / std::max(cfg.block_size, 1)),
      blocks_(cfg.num_blocks, cfg.block_size) {
  if (cfg.max_inflight < 1 || cfg.max_inflight > 2) throw std::invalid_argument("max_inflight must be 1 or 2");
  if (!cfg.has_model[kSLM] && !cfg.has_model[kLLM]) throw std::invalid_argument("no model loaded");
  if (cfg.max_num_seqs <= 0 || cfg.max_model_len <= 1 || cfg.max_step_tokens <= 0 || cfg.max_logits_rows <= 0)
    throw std::invalid_argument("max_num_seqs, max_model_len, max_step_tokens, max_logits_rows must be positive");
  for (int32_t s = cfg.max_num_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
}

void Scheduler::set_parking(int32_t llm_min_batch, float llm_batch_share, int32_t llm_max_wait) {
  if (llm_min_batch < 1 || llm_max_wait < 0 || !(llm_batch_share >= 0.f && llm_batch_share <= 1.f))
    throw std::invalid_argument("parking: llm_min_batch >= 1, llm_batch_share in [0, 1], llm_max_wait >= 0");
  cfg_.llm_min_batch = llm_min_batch;
  cfg_.llm_batch_share = llm_batch_share;
  cfg_.llm_max_wait = llm_max_wait;
}

std::string Scheduler::add(const RequestSpec& spec) {
  if (requests_.count(spec.id)) return "request id " + std::to_string(spec.id) + " is already in use";
  const int64_t n = static_cast<int64_t>(spec.prompt.size());
  if (n == 0) return "the prompt is empty";
  for (int32_t t : spec.prompt)
    if (t < 0 || t >= cfg_.vocab_size)
      return "prompt token id " + std::to_string(t) + " is outside the vocabulary [0, " +
             std::to_string(cfg_.vocab_size) + ")";
  if (n >= cfg_.max_model_len)
    return "the prompt has " + std::to_string(n) + " tokens; the context holds " +
           std::to_string(cfg_.max_model_len) + " and one more is needed to generate";
  if (spec.max_tokens < 1) return "max_tokens must be at least 1";
  if (spec.start_model != kSLM && spec.start_model != kLLM) return "start_model must be 0 (SLM) or 1 (LLM)";
  for (uint8_t f : spec.forced)
    if (f > 1) return "forced pattern entries must be 0 (SLM) or 1 (LLM)";
  const bool may_use_llm = spec.start_model == kLLM || spec.spec_k > 0 || spec.tau_up < kInf ||
                           spec.use_router || !spec.forced.empty();
  const bool may_use_slm = spec.start_model == kSLM || spec.spec_k > 0 || spec.tau_down > -kInf ||
                           spec.handover_after > 0 || !spec.forced.empty();
  if (may_use_llm && !cfg_.has_model[kLLM]) return "this policy needs the LLM, which is not loaded";
  if (may_use_slm && !cfg_.has_model[kSLM]) return "this policy needs the SLM, which is not loaded";
  if (spec.min_llm_run < 0) return "min_llm_run must be >= 0";
  if (spec.spec_k < 0 || spec.spec_k + 1 > cfg_.max_logits_rows)
    return "spec k must be in [0, max_logits_rows - 1]";
  if (spec.accept_rate > 1.f) return "accept_rate must be at most 1";

  auto r = std::make_unique<Request>();
  r->spec = spec;
  r->n_prompt = static_cast<int32_t>(n);
  r->tokens = spec.prompt;
  r->active = spec.start_model;
  r->vlen = r->n_prompt;
  waiting_.push_back(r.get());
  requests_[spec.id] = std::move(r);
  return "";
}

Request& Scheduler::get(int64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("unknown request id " + std::to_string(id));
  return *it->second;
}

const Request& Scheduler::request(int64_t id) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("unknown request id " + std::to_string(id));
  return *it->second;
}

void Scheduler::finish(int64_t id, Finish why, const std::string& error) {
  Request& r = get(id);
  if (r.phase != Phase::kFinished) end(r, why, error);
}

void Scheduler::release(int64_t id) {
  Request& r = get(id);
  if (r.phase != Phase::kFinished) throw std::logic_error("request " + std::to_string(id) + " is still live");
  requests_.erase(id);
}

std::vector<int64_t> Scheduler::take_finished() {
  std::vector<int64_t> out;
  out.swap(finished_);
  return out;
}

std::vector<int64_t> Scheduler::take_started() {
  std::vector<int64_t> out;
  out.swap(started_);
  return out;
}

void Scheduler::end(Request& r, Finish why, const std::string& error) {
  if (r.phase == Phase::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), &r));
    blocks_.release(r.table);
    free_slots_.push_back(r.seq_slot);
    r.seq_slot = -1;
  } else if (r.phase == Phase::kWaiting) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &r));
  }
  // In-flight results of r are ignored from now on; its blocks may be reused at once because the device
  // runs steps in order, so the in-flight writes land before any later owner's.
  r.inflight.clear();
  r.phase = Phase::kFinished;
  r.finish = why;
  r.error = error;
  finished_.push_back(r.spec.id);
}

bool Scheduler::reset_prefix_cache() { return running_.empty() && blocks_.reset_cache(); }

bool Scheduler::admit(Request& r, int64_t step, std::array<SubBatch, 2>& sub, StepRecord& rec, int32_t reserve) {
  if (caches(r)) {
    // the cached blocks of the longest known prefix, short of the last token (it must be fed)
    blocks_.share(r.table, blocks_.match(r.tokens, static_cast<int64_t>(r.tokens.size()) - 1));
    r.num_hashed = static_cast<int32_t>(r.table.size());
    reuse_cached_kv(r);
  }
  const Next nx = next_dispatch(r, cfg_.max_model_len);
  const SubBatch& sb = sub[nx.model];
  const int32_t first_end = std::min(nx.end, nx.start + (layout_.max_tokens - sb.tokens));
  if (sb.rows >= layout_.max_rows || sb.tokens >= layout_.max_tokens ||
      blocks_.missing(r.table, first_end) + reserve > blocks_.num_free()) {
    blocks_.release(r.table);
    r.num_hashed = 0;
    r.filled = {0, 0};
    return false;
  }
  waiting_.pop_front();
  if (!r.started) started_.push_back(r.spec.id);
  r.started = true;
  if (caches(r)) {
    r.stats.prefix_queries += static_cast<int64_t>(r.tokens.size());
    for (int32_t m = 0; m < 2; ++m) r.stats.prefix_hits[m] += r.filled[m];
  }
  r.seq_slot = free_slots_.back();
  free_slots_.pop_back();
  r.phase = Phase::kRunning;
  r.table_synced = 0;
  running_.push_back(&r);
  schedule(r, step, sub, rec);
  return true;
}

void Scheduler::hash_committed(Request& r) {
  const int32_t bs = cfg_.block_size;
  const int32_t full = std::min(static_cast<int32_t>(r.tokens.size()) / bs, static_cast<int32_t>(r.table.size()));
  for (int32_t i = r.num_hashed; i < full; ++i) {
    blocks_.hash_block(r.table, r.tokens, i);
    // committed positions below filled[m] hold model m's KV of the committed tokens (rollback's invariant)
    for (int32_t m = 0; m < 2; ++m)
      if (r.filled[m] >= (i + 1) * bs) blocks_.set_kv(r.table[i], m);
  }
  r.num_hashed = std::max(r.num_hashed, full);
}

void Scheduler::reuse_cached_kv(Request& r) {
  const int32_t bs = cfg_.block_size;
  for (int32_t m = 0; m < 2; ++m) {
    int32_t& f = r.filled[m];
    while (f % bs == 0 && f / bs < r.num_hashed && blocks_.has_kv(r.table[f / bs], m)) f += bs;
  }
}

void Scheduler::preempt(Request& r) {
  // Recompute later: drop the KV of both models, keep the committed tokens.
  r.stats.preemptions++;
  running_.erase(std::find(running_.begin(), running_.end(), &r));
  blocks_.release(r.table);
  r.table_synced = 0;
  free_slots_.push_back(r.seq_slot);
  r.seq_slot = -1;
  r.inflight.clear();
  r.filled = {0, 0};
  r.num_hashed = 0;
  r.vlen = static_cast<int32_t>(r.tokens.size());
  r.vllm_run = r.llm_run;
  r.drafts.clear();
  r.drafts_dispatched = 0;
  r.awaiting = false;
  r.phase = Phase::kWaiting;
  waiting_.push_front(&r);
}

void Scheduler::fail_nonfinite(Request& r, const std::string& why) {
  // r's KV may hold the NaN: no later request may reuse its cached blocks, and running requests that share
  // one have read it (an attention backend may turn NaN into zeros, so they need not have noticed).
  std::vector<int32_t> cached;
  for (int32_t i = 0; i < r.num_hashed; ++i)
    if (blocks_.is_cached(r.table[i])) cached.push_back(r.table[i]);
  std::vector<Request*> sharers;
  for (Request* o : running_)
    if (o != &r && std::any_of(o->table.begin(), o->table.begin() + o->num_hashed, [&](int32_t b) {
          return std::find(cached.begin(), cached.end(), b) != cached.end();
        }))
      sharers.push_back(o);
  for (int32_t b : cached) blocks_.forget(b);
  end(r, Finish::kError, why);
  for (Request* o : sharers)
    end(*o, Finish::kError, "its prompt shares cached KV blocks with a request whose KV held NaN/inf values");
}

void Scheduler::rollback(Request& r) {
  for (auto& d : r.inflight) d.stale = true;
  const int32_t len = static_cast<int32_t>(r.tokens.size());
  for (auto& f : r.filled) f = std::min(f, len);
  r.vlen = len;
  r.vllm_run = r.llm_run;
  r.awaiting = false;
  blocks_.truncate(r.table, len);
  r.table_synced = std::min(r.table_synced, r.table.size());
}

// Whether r could be one of the LLM rows a parked batch waits for: a stitch request on the LLM, or one
// whose policy may switch to it.
static bool may_join_llm_batch(const Request& r) {
  if (r.spec.spec_k != 0) return false;
  return r.active == kLLM || r.spec.tau_up < kInf || r.spec.use_router || !r.spec.forced.empty();
}

bool Scheduler::park_llm_rows() const {
  if (cfg_.llm_min_batch <= 1 && cfg_.llm_batch_share <= 0.f) return false;
  int32_t ready = 0, waited = 0, could_join = 0, others = 0;
  for (const Request* r : running_) {
    const bool ready_llm = r->spec.spec_k == 0 && r->active == kLLM && dispatchable(*r);
    others += !ready_llm && dispatchable(*r);
    if (!may_join_llm_batch(*r)) continue;
    ++could_join;
    if (!ready_llm) continue;
    ++ready;
    waited = std::max(waited, r->parked_steps);
  }
  // Queued requests count only as far as free sequence slots let them start: a backlog must not raise the
  // batch to wait for past what the running set can form.
  int32_t startable = static_cast<int32_t>(free_slots_.size());
  for (const Request* r : waiting_) {
    if (startable == 0) break;
    if (may_join_llm_batch(*r)) {
      ++could_join;
      --startable;
    }
  }
  // Never wait for a batch that cannot form (every live request that could join is ready already, or
  // there are fewer of them than wanted), nor through a step that would run nothing else.
  // (the 1e-4 keeps a product like 0.7 * 10 = 7.0000005 from asking for 8)
  const float share = cfg_.llm_batch_share * static_cast<float>(could_join);
  const int32_t want = std::max(cfg_.llm_min_batch, static_cast<int32_t>(std::ceil(share - 1e-4f)));
  if (could_join == ready || could_join < want || others == 0) return false;
  return ready > 0 && ready < want && waited < cfg_.llm_max_wait;
}

bool Scheduler::dispatchable(const Request& r) const {
  if (r.phase != Phase::kRunning || r.awaiting) return false;
  if (static_cast<int32_t>(r.inflight.size()) >= cfg_.max_inflight) return false;
  if (r.spec.spec_k > 0) return r.n_out() < r.spec.max_tokens;  // a round never outgrows its budget
  return r.vlen - r.n_prompt < r.spec.max_tokens && r.vlen < cfg_.max_model_len;
}

namespace {

Next next_dispatch(const Request& r, int32_t max_model_len) {
  Next n{};
  if (r.spec.spec_k > 0) {
    const int32_t len = static_cast<int32_t>(r.tokens.size());
    const int32_t k = std::min({r.spec.spec_k, r.spec.max_tokens - r.n_out() - 1, max_model_len - len - 1});
    if (r.drafts_dispatched < k) {
      n = {kSLM, Kind::kDraft, 0, r.vlen, 1};
    } else {
      n = {kLLM, Kind::kVerify, 0, r.vlen, r.drafts_dispatched + 1};
    }
  } else {
    n = {r.active, Kind::kStitch, 0, r.vlen, 1};
  }
  // The inputs of the logits rows must be fed even when their KV is already there (a re-run after a
  // stale dispatch), so the span starts no later than the first of them.
  n.start = std::min(r.filled[n.model], n.end - n.num_logits);
  return n;
}

}  // namespace

bool Scheduler::make_room(Request& r, int64_t num_tokens) {
  while (!blocks_.can_cover(r.table, num_tokens)) {
    // Victim: the newest running request not yet planned in this step (never one whose rows are written).
    Request* victim = nullptr;
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      Request* c = *it;
      if (c == &r) continue;
      if (!c->inflight.empty() && c->inflight.back().step == current_step_) continue;
      victim = c;
      break;
    }
    if (!victim) {
      preempt(r);
      return false;
    }
    preempt(*victim);
  }
  blocks_.cover(r.table, num_tokens);
  return true;
}

bool Scheduler::schedule(Request& r, int64_t step, std::array<SubBatch, 2>& sub, StepRecord& rec) {
  if (caches(r)) {  // KV of shared blocks that another request computed since the last dispatch
    const std::array<int32_t, 2> before = r.filled;
    reuse_cached_kv(r);
    for (int32_t m = 0; m < 2; ++m) r.stats.prefix_hits[m] += r.filled[m] - before[m];
  }
  Next nx = next_dispatch(r, cfg_.max_model_len);
  SubBatch& sb = sub[nx.model];
  if (sb.rows >= layout_.max_rows) return false;
  Kind kind = nx.kind;
  int32_t end = nx.end, num_logits = nx.num_logits;
  const int32_t budget = layout_.max_tokens - sb.tokens;
  const bool logits_fit = sb.logits + num_logits <= layout_.max_logits;
  if (end - nx.start > budget || !logits_fit) {
    // Chunked extend: feed a prefix that stops short of the logits rows; decide in a later step.
    const int32_t chunk_end = std::min(nx.start + budget, end - num_logits);
    if (chunk_end <= nx.start) return false;
    kind = Kind::kChunk;
    end = chunk_end;
    num_logits = 0;
  }
  if (!make_room(r, end)) return false;
  if (caches(r)) hash_committed(r);

  write_row(r, sb, nx.model, kind, nx.start, end, num_logits);
  // Hashed blocks this dispatch completes hold its model's KV from now on: steps run in order, so any
  // later reader runs after this write (a reader in the same step too: each layer stores, then attends).
  for (int32_t i = nx.start / cfg_.block_size; i < std::min(end / cfg_.block_size, r.num_hashed); ++i)
    blocks_.set_kv(r.table[i], nx.model);
  const int32_t span = end - nx.start;
  if (span > 1) (nx.model == kSLM ? r.stats.extend_tokens_slm : r.stats.extend_tokens_llm) += span;
  r.filled[nx.model] = end;
  r.inflight.push_back({step, nx.model, kind, nx.start, end, false});
  switch (kind) {
    case Kind::kChunk:
      break;
    case Kind::kStitch:
      r.vlen++;
      if (nx.model == kLLM) {
        r.vllm_run++;
        if (!cfg_.optimistic_llm) r.awaiting = true;
      }
      break;
    case Kind::kDraft:
      r.vlen++;
      r.drafts_dispatched++;
      break;
    case Kind::kVerify:
      r.awaiting = true;  // the accepted length decides everything after it
      break;
  }
  rec.rows[nx.model].push_back({r.spec.id, num_logits});
  return true;
}

float Scheduler::tau_up(const Request& r, int32_t out_index) const {
  const auto& f = r.spec.forced;
  if (!f.empty()) return out_index < static_cast<int32_t>(f.size()) && f[out_index] == kLLM ? -kInf : kInf;
  return r.spec.tau_up;
}

float Scheduler::tau_down(const Request& r, int32_t out_index) const {
  const auto& f = r.spec.forced;
  if (!f.empty())
    return out_index + 1 < static_cast<int32_t>(f.size()) && f[out_index + 1] == kLLM ? -kInf : kInf;
  if (r.spec.handover_after > 0) return r.vllm_run + 1 >= r.spec.handover_after ? kInf : -kInf;
  if (r.vllm_run + 1 < r.spec.min_llm_run) return -kInf;  // a minimum run: no hand-back before it
  return r.spec.tau_down;
}

void Scheduler::write_row(Request& r, SubBatch& sb, int32_t model, Kind kind, int32_t start, int32_t end,
                          int32_t num_logits) {
  const PlanLayout& L = layout_;
  const int32_t n = end - start, t0 = sb.tokens, row = sb.rows;
  const int32_t committed = static_cast<int32_t>(r.tokens.size());
  int32_t* const I = sb.i32;
  float* const F = sb.f32;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t pos = start + i, t = t0 + i;
    const bool known = pos < committed;  // else an in-flight token: read it from the device token table
    I[L.input_ids + t] = known ? r.tokens[pos] : -1;
    I[L.token_index + t] = known ? -1 : r.seq_slot * cfg_.max_model_len + pos;
    I[L.positions + t] = pos;
    // KV a shared block holds already is not stored again (-1, as padding): the same tokens at the same
    // positions, and another request may be reading it
    const int32_t block = r.table[pos / cfg_.block_size];
    I[L.slot_mapping + t] = blocks_.has_kv(block, model) ? -1 : static_cast<int32_t>(blocks_.slot(r.table, pos));
  }
  I[L.query_start_loc + row] = t0;
  I[L.query_start_loc + row + 1] = t0 + n;
  I[L.seq_lens + row] = end;
  I[L.seq_slot + row] = r.seq_slot;
  int32_t* header = I + L.header;
  header[kMaxSeqLen] = std::max(header[kMaxSeqLen], end);
  header[kMaxQueryLen] = std::max(header[kMaxQueryLen], n);

  const bool sampling = r.spec.temperature > 0.f;
  const bool stitch = kind == Kind::kStitch;
  const bool router = stitch && model == kSLM && r.spec.use_router && r.spec.forced.empty();
  const int32_t l0 = sb.logits, n_out = r.n_out();
  for (int32_t j = 0; j < num_logits; ++j) {
    const int32_t li = l0 + j;
    const int32_t pred = end - num_logits + j + 1;  // position of the token this row produces
    const int32_t out_index = pred - r.n_prompt;
    I[L.logits_indices + li] = t0 + n - num_logits + j;
    I[L.out_slot + li] = r.seq_slot;
    I[L.out_pos + li] = kind == Kind::kVerify ? -1 : pred;
    I[L.sample_pos + li] = pred;
    I[L.spec_index + li] = kind == Kind::kVerify ? j : kind == Kind::kDraft ? r.drafts_dispatched : -1;
    I[L.top_k + li] = r.spec.top_k;
    I[L.seed + li] = r.spec.seed;
    I[L.verify_start + li] = kind == Kind::kVerify ? l0 : -1;
    I[L.use_router + li] = router ? 1 : 0;
    F[L.temperature + li] = r.spec.temperature;
    F[L.top_p + li] = r.spec.top_p;
    F[L.tau_up + li] = stitch && model == kSLM ? tau_up(r, out_index) : kInf;
    F[L.tau_down + li] = stitch && model == kLLM ? tau_down(r, out_index) : -kInf;
    F[L.accept_rate + li] = kind == Kind::kVerify ? r.spec.accept_rate : -1.f;
    float* feat = F + L.router_features + static_cast<int64_t>(li) * kRouterFeatures;
    feat[0] = static_cast<float>(pred) / 4096.f;
    feat[1] = static_cast<float>(out_index) / static_cast<float>(r.spec.max_tokens);
    feat[2] = n_out > 0 ? static_cast<float>(r.stats.llm_tokens) / static_cast<float>(n_out) : 0.f;
    feat[3] = r.last_llm_out < 0 ? 1.f : std::min(1.f, static_cast<float>(out_index - r.last_llm_out) / 64.f);
  }
  if (num_logits > 0) {
    header[kAnyTopKTopP] |= sampling && (r.spec.top_k > 0 || r.spec.top_p < 1.f);
    header[kAnyRouter] |= router;
    header[kAnyVerify] |= kind == Kind::kVerify;
    header[kAnySampling] |= sampling;
    header[kAnyDraft] |= kind == Kind::kDraft;
  }
  sb.tokens += n;
  sb.rows += 1;
  sb.logits += num_logits;

  for (size_t i = r.table_synced; i < r.table.size(); ++i) {
    if (num_table_updates_ >= table_layout_.capacity) throw std::logic_error("block-table update buffer overflow");
    table_updates_[1 + num_table_updates_] = r.seq_slot * max_blocks_per_seq_ + static_cast<int32_t>(i);
    table_updates_[1 + table_layout_.capacity + num_table_updates_] = r.table[i];
    ++num_table_updates_;
  }
  r.table_synced = r.table.size();
}

int32_t Scheduler::plan(int64_t step, std::array<PlanBuffers, 2> bufs, int32_t* table_updates) {
  std::array<SubBatch, 2> sub;
  for (int32_t m = 0; m < 2; ++m) {
    sub[m].i32 = bufs[m].i32;
    sub[m].f32 = bufs[m].f32;
    if (cfg_.has_model[m]) {
      if (!sub[m].i32 || !sub[m].f32) throw std::invalid_argument(std::string("no plan buffers for the ") + model_name(m));
      std::fill(sub[m].i32, sub[m].i32 + kHeaderSize, 0);
      (sub[m].i32 + layout_.query_start_loc)[0] = 0;
    } else {
      sub[m].rows = layout_.max_rows;  // nothing can be planned on a model that is not loaded
    }
  }
  table_updates_ = table_updates;
  num_table_updates_ = 0;
  current_step_ = step;
  StepRecord rec;

  const std::vector<Request*> snapshot(running_);  // preemption edits running_
  const bool park = park_llm_rows();
  for (Request* r : snapshot) {
    if (!dispatchable(*r)) continue;
    if (park && r->spec.spec_k == 0 && r->active == kLLM) {
      r->parked_steps++;
      r->stats.llm_wait_steps++;
      rec.parked.push_back(r->spec.id);
      continue;
    }
    if (schedule(*r, step, sub, rec)) r->parked_steps = 0;
  }

  while (!waiting_.empty() && !free_slots_.empty() &&
         admit(*waiting_.front(), step, sub, rec, running_.empty() ? 0 : cfg_.watermark_blocks)) {
  }

  int32_t rows = 0;
  for (int32_t m = 0; m < 2; ++m) {
    if (!cfg_.has_model[m]) continue;
    sub[m].i32[kNumRows] = sub[m].rows;
    sub[m].i32[kNumTokens] = sub[m].tokens;
    sub[m].i32[kNumLogits] = sub[m].logits;
    rows += sub[m].rows;
  }
  table_updates[0] = static_cast<int32_t>(num_table_updates_);
  if (rows > 0) {
    steps_[step] = std::move(rec);
    if (sub[kLLM].rows > 0 && cfg_.has_model[kLLM]) {
      ++llm_steps_;
      llm_step_rows_ += sub[kLLM].rows;
    }
  }
  return rows;
}

bool Scheduler::emit(Request& r, int32_t token, int32_t source, float entropy, Event& ev) {
  r.tokens.push_back(token);
  r.sources.push_back(static_cast<uint8_t>(source));
  r.entropies.push_back(entropy);
  (source == kSLM ? r.stats.slm_tokens : r.stats.llm_tokens)++;
  if (source == kLLM) r.last_llm_out = r.n_out() - 1;
  ev.new_tokens.push_back(token);
  ev.new_sources.push_back(source);
  ev.new_entropies.push_back(entropy);
  const auto& stops = r.spec.stop_ids;
  if (r.n_out() >= r.spec.min_tokens &&
      std::find(stops.begin(), stops.end(), token) != stops.end()) {
    end(r, Finish::kStop);
  } else if (r.n_out() >= r.spec.max_tokens || static_cast<int32_t>(r.tokens.size()) >= cfg_.max_model_len) {
    end(r, Finish::kLength);
  }
  return r.phase == Phase::kFinished;
}

void Scheduler::apply(Request& r, const Dispatch& d, const Results& res, int64_t row,
                      std::vector<Event>& events) {
  Event ev{r.spec.id, {}, {}, {}, Finish::kNone};
  r.trace.push_back({d.model, d.end - d.start, d.start});
  auto nan_error = [&](int64_t at) {
    fail_nonfinite(r, std::string("the ") + model_name(d.model) +
                          " produced NaN/inf values (logits or hidden states) at position " +
                          std::to_string(r.tokens.size() + (at - row)));
  };
  switch (d.kind) {
    case Kind::kChunk:
      return;
    case Kind::kDraft:
      if (res.flags[row] & kNaN) {
        nan_error(row);
        break;
      }
      r.drafts.emplace_back(res.tokens[row], res.entropies[row]);
      return;
    case Kind::kStitch: {
      const int32_t flags = res.flags[row];
      if (flags & kNaN) {
        nan_error(row);
        break;
      }
      if (d.model == kSLM) {
        // The router was asked where the entropy rule alone would switch (the stitch step compares the
        // same float32 values); its decision is the one that took effect.
        const int32_t out_index = r.n_out();
        if (r.spec.use_router && r.spec.forced.empty() && res.entropies[row] > tau_up(r, out_index))
          r.routed.push_back(out_index);
        if (flags & kKeep) {
          emit(r, res.tokens[row], kSLM, res.entropies[row], ev);
        } else {
          r.stats.discarded_slm_tokens++;
          r.stats.switches_to_llm++;
          r.active = kLLM;
          r.llm_run = 0;
          rollback(r);
        }
      } else {
        r.awaiting = false;
        r.llm_run++;
        if (!emit(r, res.tokens[row], kLLM, res.entropies[row], ev) && !(flags & kNextLLM)) {
          r.stats.switches_to_slm++;
          r.active = kSLM;
          r.llm_run = 0;
          rollback(r);
        }
      }
      break;
    }
    case Kind::kVerify: {
      const int32_t k = static_cast<int32_t>(r.drafts.size());
      int32_t kept = 0;
      while (kept <= k && (res.flags[row + kept] & kKeep)) ++kept;
      for (int32_t j = 0; j < std::max(kept, 1); ++j)
        if (res.flags[row + j] & kNaN) {
          nan_error(row + j);
          break;
        }
      if (r.phase == Phase::kFinished) break;
      if (kept < 1) throw std::logic_error("a verify group kept no token");
      const int32_t accepted = kept - 1;
      r.stats.drafted += k;
      r.stats.accepted += accepted;
      r.stats.verify_steps++;
      r.awaiting = false;
      // Keep the accepted drafts: clip both caches there before appending anything.
      const int32_t keep_len = static_cast<int32_t>(r.tokens.size()) + accepted;
      for (auto& f : r.filled) f = std::min(f, keep_len);
      bool done = false;
      for (int32_t j = 0; j < accepted && !done; ++j) done = emit(r, r.drafts[j].first, kSLM, r.drafts[j].second, ev);
      if (!done) emit(r, res.tokens[row + accepted], kLLM, res.entropies[row + accepted], ev);
      r.drafts.clear();
      r.drafts_dispatched = 0;
      if (r.phase == Phase::kRunning) rollback(r);
      break;
    }
  }
  if (!ev.new_tokens.empty() || r.phase == Phase::kFinished) {
    ev.finish = r.finish;
    events.push_back(std::move(ev));
  }
}

std::vector<Event> Scheduler::commit(int64_t step, std::array<Results, 2> results, std::array<double, 2> seconds) {
  auto it = steps_.find(step);
  if (it == steps_.end()) throw std::invalid_argument("step " + std::to_string(step) + " was not planned");
  StepRecord rec = std::move(it->second);
  steps_.erase(it);
  for (int64_t id : rec.parked) {
    auto rit = requests_.find(id);
    if (rit != requests_.end()) rit->second->stats.llm_wait_s += seconds[kSLM] + seconds[kLLM];
  }
  std::vector<Event> events;
  for (int32_t m = 0; m < 2; ++m) {
    int64_t row = 0;
    for (const RowRef& ref : rec.rows[m]) {
      if (row + ref.num_logits > results[m].size)
        throw std::invalid_argument(std::string("too few results for the ") + model_name(m));
      auto rit = requests_.find(ref.id);
      if (rit != requests_.end()) {
        Request& r = *rit->second;
        if (r.phase == Phase::kRunning && !r.inflight.empty() && r.inflight.front().step == step) {
          const Dispatch d = r.inflight.front();
          r.inflight.pop_front();
          (m == kSLM ? r.stats.time_slm_s : r.stats.time_llm_s) += seconds[m];
          if (d.stale)
            r.stats.stale_rows++;
          else
            apply(r, d, results[m], row, events);
        }
      }
      row += ref.num_logits;
    }
  }
  return events;
}

}  // namespace rstitch
