// The layout of one step's plan for one model: two flat buffers (int32 and float32) of fixed capacity,
// written by the scheduler into pinned host memory and copied to the device in one transfer each.
// Python builds its tensor views from `fields()`, so the layout is defined here only.
#pragma once

#include <cstdint>
#include <stdexcept>
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

  PlanLayout(int32_t tokens, int32_t rows, int32_t logits)
      : max_tokens(tokens), max_rows(rows), max_logits(logits) {
    add("header", 'i', kHeaderSize);
    // per token
    add("input_ids", 'i', tokens);    // token id known on the host, else -1
    add("token_index", 'i', tokens);  // flat index into the device token table, else -1
    add("positions", 'i', tokens);
    add("slot_mapping", 'i', tokens);
    // per forward row
    add("query_start_loc", 'i', rows + 1);
    add("seq_lens", 'i', rows);
    add("seq_slot", 'i', rows);
    // per logits row
    add("logits_indices", 'i', logits);
    add("out_slot", 'i', logits);   // token-table row that receives the produced token
    add("out_pos", 'i', logits);    // its position there; -1: not written (verify rows)
    add("sample_pos", 'i', logits); // position of the produced token: the sampling noise key
    add("spec_index", 'i', logits); // j of the j-th draft (SLM) or of the j-th verify row (LLM); else -1
    add("top_k", 'i', logits);      // 0: off
    add("seed", 'i', logits);
    add("verify_start", 'i', logits);  // logits row of the group's first row; -1: not a verify row
    add("use_router", 'i', logits);
    add("temperature", 'f', logits);
    add("top_p", 'f', logits);
    add("tau_up", 'f', logits);     // SLM row: H > tau_up discards its token and switches to the LLM
    add("tau_down", 'f', logits);   // LLM row: H <= tau_down hands the next position back to the SLM
    add("router_features", 'f', static_cast<int64_t>(logits) * kRouterFeatures);
  }

  const Field& field(const std::string& name) const {
    for (const auto& f : fields)
      if (f.name == name) return f;
    throw std::out_of_range("no plan field " + name);
  }

 private:
  void add(const char* name, char type, int64_t length) {
    int64_t& size = type == 'i' ? i32_size : f32_size;
    fields.push_back({name, type, size, length});
    size += length;
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
