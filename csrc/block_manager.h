// Fixed-size KV blocks behind one block table per request.
//
// Both models see the same token sequence at the same positions, so block b holds positions
// [i*block_size, (i+1)*block_size) of one request in the SLM pool and in the LLM pool alike: one table
// addresses two physical pools that were sized for the same number of tokens.
#pragma once

#include <cstdint>
#include <vector>

namespace rstitch {

using BlockTable = std::vector<int32_t>;

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t num_blocks() const { return static_cast<int32_t>(used_.size()); }
  int32_t block_size() const { return block_size_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }

  int32_t blocks_for(int64_t num_tokens) const {
    return static_cast<int32_t>((num_tokens + block_size_ - 1) / block_size_);
  }
  // Blocks `table` still needs to hold `num_tokens` positions.
  int32_t missing(const BlockTable& table, int64_t num_tokens) const;
  bool can_cover(const BlockTable& table, int64_t num_tokens) const {
    return missing(table, num_tokens) <= num_free();
  }
  // Appends blocks until the table holds `num_tokens` positions; throws std::runtime_error if it can't.
  void cover(BlockTable& table, int64_t num_tokens);
  // Frees the blocks past the first `num_tokens` positions (rollback).
  void truncate(BlockTable& table, int64_t num_tokens);
  void release(BlockTable& table) { truncate(table, 0); }

  int64_t slot(const BlockTable& table, int64_t pos) const {
    return static_cast<int64_t>(table[pos / block_size_]) * block_size_ + pos % block_size_;
  }

 private:
  int32_t block_size_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::vector<uint8_t> used_;  // catches double frees
};

}  // namespace rstitch
