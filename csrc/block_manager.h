// Fixed-size KV blocks behind one block table per request, with automatic prefix caching.
//
// Both models see the same token sequence at the same positions, so block b holds positions
// [i*block_size, (i+1)*block_size) of one request in the SLM pool and in the LLM pool alike: one table
// addresses two physical pools that were sized for the same number of tokens.
//
// Prefix caching (docs/design.md, 'Prefix caching'): a full block of committed tokens gets a content hash
// chained over the blocks before it; registered blocks can be shared by later requests with the same
// prefix (reference counted) and stay cached after their last holder lets go, evicted least recently
// released first when a fresh block is needed. Each block records which model's KV it holds, since a
// prefix may have been computed for the SLM and not (yet) for the LLM.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace rstitch {

using BlockTable = std::vector<int32_t>;

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t num_blocks() const { return static_cast<int32_t>(refs_.size()); }
  int32_t block_size() const { return block_size_; }
  // Blocks a request can get: never used, or cached with no holder (evicted on demand).
  int32_t num_free() const { return static_cast<int32_t>(free_.size() + evictable_.size()); }
  int32_t num_cached() const { return static_cast<int32_t>(cached_.size()); }

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
  // Lets go of the blocks past the first `num_tokens` positions (rollback).
  void truncate(BlockTable& table, int64_t num_tokens);
  void release(BlockTable& table) { truncate(table, 0); }

  int64_t slot(const BlockTable& table, int64_t pos) const {
    return static_cast<int64_t>(table[pos / block_size_]) * block_size_ + pos % block_size_;
  }

  // ---- prefix caching ----
  // The cached blocks that hold the longest run of full blocks beginning `tokens` within its first `limit`
  // tokens (a request must still feed at least one token). Takes no reference.
  std::vector<int32_t> match(const std::vector<int32_t>& tokens, int64_t limit) const;
  // Of `blocks` (a match), how many have no holder: sharing them takes them out of num_free().
  int32_t num_unheld(const std::vector<int32_t>& blocks) const;
  // Starts an empty table with the matched blocks, one reference each.
  void share(BlockTable& table, const std::vector<int32_t>& blocks);
  // Hashes table[i] (full, of committed `tokens`; the blocks before it hashed already) and registers it
  // for sharing unless an equal block is registered already.
  void hash_block(const BlockTable& table, const std::vector<int32_t>& tokens, int32_t i);
  bool is_cached(int32_t b) const { return cached_flag_[b] != 0; }
  bool has_kv(int32_t b, int32_t model) const { return (kv_[b] >> model) & 1; }
  // Model `model`'s KV of block b is computed (or written by a step already planned: steps run in order).
  void set_kv(int32_t b, int32_t model) { kv_[b] |= static_cast<uint8_t>(1 << model); }
  // Stops offering block b for sharing (its holders keep it; it is freed, not cached, after the last).
  void forget(int32_t b);
  // Forgets every cached block that no request holds (they become free); false, and nothing changes,
  // while any block is held.
  bool reset_cache();

 private:
  int32_t take();         // a free block, else the least recently released cached one (evicted)
  void drop(int32_t b);   // one reference less
  void uncache(int32_t b);

  int32_t block_size_;
  std::vector<int32_t> free_;   // a stack: the most recently freed block is reused first
  std::vector<int32_t> refs_;   // holders per block; catches double frees
  // per block: content hash (set for full committed blocks), cached flag, KV held per model (bit m)
  std::vector<uint64_t> hash_;
  std::vector<uint8_t> hashed_, cached_flag_, kv_;
  std::vector<int32_t> tokens_;  // [num_blocks * block_size]: a cached block's tokens, checked on a match
  std::unordered_map<uint64_t, int32_t> cached_;  // hash -> block
  std::list<int32_t> evictable_;                  // cached, unheld; front: released longest ago
  std::vector<std::list<int32_t>::iterator> lru_pos_;
};

}  // namespace rstitch
