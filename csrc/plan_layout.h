// The layout of one step's plan for one model: two flat buffers (int32 and float32) of fixed capacity,
// written by the scheduler into pinned host memory and copied to the device in one transfer each.
// Python builds its tensor views from `fields()`, so the layout is defined here only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rstitch {

// Header slots (int32) at the start of every model plan.
enum Header : int32_t {
  kNumRows = 0,      // forward rows (requests) in this sub-batch
  kNumTokens,        // new tokens fed
  kNumLogits,        // rows of logits computed (one per deciding row, k+1 per verify row)
  kMaxSeqLen,        // longest context after this forward
  kMaxQueryLen,      // most new tokens of one row (1: a pure decode step)
  kAnyTopKTopP,      // some logits row restricts sampling by top-k / top-p
  kAnyRouter,        // some logits row asks the R-Stitch+ router
  kAnyVerify,        // some logits rows verify speculative drafts
  kAnySampling,      // some logits row samples (temperature > 0)
  kAnyDraft,         // some logits rows produce speculative drafts
  kHeaderSize = 16,
};

// Flags of one logits row's result (written on the device by the stitch-step kernel).
enum ResultFlag : int32_t { kKeep = 1, kNextLLM = 2, kNaN = 4 };

constexpr int32_t kRouterFeatures = 4;

struct Field {
  std::string name;
  char type;  // 'i': int32 buffer, 'f': float32 buffer
  int64_t offset;
  int64_t length;
};

struct PlanLayout {
  int32_t max_tokens, max_rows, max_logits;
  std::vector<Field> fields;
  int64_t i32_size = 0, f32_size = 0;
  // Offsets of each field in its buffer, resolved once (the planner writes them per row).
  int64_t header, input_ids, token_index, positions, slot_mapping, query_start_loc, seq_lens, seq_slot,
      logits_indices, out_slot, out_pos, sample_pos, spec_index, top_k, seed, verify_start, use_router,
      temperature, top_p, tau_up, tau_down, accept_rate, router_features;

  PlanLayout(int32_t tokens, int32_t rows, int32_t logits)
      : max_tokens(tokens), max_rows(rows), max_logits(logits) {
    header = add("header", 'i', kHeaderSize);
    // per token
    input_ids = add("input_ids", 'i', tokens);      // token id known on the host, else -1
    token_index = add("token_index", 'i', tokens);  // flat index into the device token table, else -1
    positions = add("positions", 'i', tokens);
    slot_mapping = add("slot_mapping", 'i', tokens);
    // per forward row
    query_start_loc = add("query_start_loc", 'i', rows + 1);
    seq_lens = add("seq_lens", 'i', rows);
    seq_slot = add("seq_slot", 'i', rows);
    // per logits row
    logits_indices = add("logits_indices", 'i', logits);
    out_slot = add("out_slot", 'i', logits);      // token-table row that receives the produced token
    out_pos = add("out_pos", 'i', logits);        // its position there; -1: not written (verify rows)
    sample_pos = add("sample_pos", 'i', logits);  // position of the produced token: the sampling noise key
    spec_index = add("spec_index", 'i', logits);  // j of the j-th draft (SLM) or verify row (LLM); else -1
    top_k = add("top_k", 'i', logits);            // 0: off
    seed = add("seed", 'i', logits);
    verify_start = add("verify_start", 'i', logits);  // logits row of the group's first row; -1: not verify
    use_router = add("use_router", 'i', logits);
    temperature = add("temperature", 'f', logits);
    top_p = add("top_p", 'f', logits);
    tau_up = add("tau_up", 'f', logits);      // SLM row: H > tau_up discards its token, switches to the LLM
    tau_down = add("tau_down", 'f', logits);  // LLM row: H <= tau_down hands the next position back
    accept_rate = add("accept_rate", 'f', logits);  // verify rows: accept drafts with this probability; < 0: verify
    router_features = add("router_features", 'f', static_cast<int64_t>(logits) * kRouterFeatures);
  }

 private:
  int64_t add(const char* name, char type, int64_t length) {
    int64_t& size = type == 'i' ? i32_size : f32_size;
    fields.push_back({name, type, size, length});
    size += length;
    return fields.back().offset;
  }
};

// Per step, for both models: new block-table entries for the device copy of the table, which is kept
// per sequence slot so that a step only ships the blocks allocated since the last one.
struct TableUpdateLayout {
  int64_t capacity;
  int64_t size() const { return 1 + 2 * capacity; }  // [count, index[capacity], value[capacity]]
  explicit TableUpdateLayout(int64_t cap) : capacity(cap) {}
};

}  // namespace rstitch
