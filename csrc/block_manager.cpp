#include "block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rstitch {

namespace {

uint64_t mix(uint64_t h, uint64_t x) {  // splitmix64's finaliser over h ^ x: a well-spread 64-bit chain
  h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

constexpr uint64_t kRootHash = 0x5253544954434821ull;  // the parent of a sequence's first block

uint64_t block_hash(uint64_t parent, const int32_t* tokens, int32_t n) {
  uint64_t h = mix(kRootHash, parent);
  for (int32_t i = 0; i < n; ++i) h = mix(h, static_cast<uint32_t>(tokens[i]));
  return h;
}

}  // namespace

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size) : block_size_(block_size) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive");
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive");
  refs_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  hashed_.assign(num_blocks, 0);
  cached_flag_.assign(num_blocks, 0);
  kv_.assign(num_blocks, 0);
  tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  lru_pos_.resize(num_blocks);
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

int32_t BlockManager::missing(const BlockTable& table, int64_t num_tokens) const {
  int32_t need = blocks_for(num_tokens) - static_cast<int32_t>(table.size());
  return need > 0 ? need : 0;
}

int32_t BlockManager::take() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    b = evictable_.front();
    evictable_.pop_front();
    uncache(b);
  }
  hashed_[b] = 0;
  kv_[b] = 0;
  refs_[b] = 1;
  return b;
}

void BlockManager::uncache(int32_t b) {
  cached_.erase(hash_[b]);
  cached_flag_[b] = 0;
}

void BlockManager::drop(int32_t b) {
  if (b < 0 || b >= num_blocks() || refs_[b] <= 0)
    throw std::logic_error("freeing block " + std::to_string(b) + " that is not in use");
  if (--refs_[b] > 0) return;
  if (cached_flag_[b]) {
    lru_pos_[b] = evictable_.insert(evictable_.end(), b);
  } else {
    free_.push_back(b);
  }
}

void BlockManager::cover(BlockTable& table, int64_t num_tokens) {
  int32_t need = missing(table, num_tokens);
  if (need > num_free())
    throw std::runtime_error("out of KV blocks: need " + std::to_string(need) + ", " +
                             std::to_string(num_free()) + " free");
  for (int32_t i = 0; i < need; ++i) table.push_back(take());
}

void BlockManager::truncate(BlockTable& table, int64_t num_tokens) {
  size_t keep = static_cast<size_t>(blocks_for(num_tokens));
  // the tail first, so that a request's last blocks are evicted before its first ones (shared prefixes)
  while (table.size() > keep) {
    drop(table.back());
    table.pop_back();
  }
}

std::vector<int32_t> BlockManager::match(const std::vector<int32_t>& tokens, int64_t limit) const {
  std::vector<int32_t> hit;
  const int64_t full = std::min<int64_t>(limit, static_cast<int64_t>(tokens.size())) / block_size_;
  uint64_t parent = 0;
  for (int64_t i = 0; i < full; ++i) {
    const int32_t* t = tokens.data() + i * block_size_;
    const uint64_t h = block_hash(parent, t, block_size_);
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    const int32_t b = it->second;
    // equal tokens in this block and an equal chain before it (its hash): the same prefix
    if (!std::equal(t, t + block_size_, tokens_.begin() + static_cast<size_t>(b) * block_size_)) break;
    hit.push_back(b);
    parent = h;
  }
  return hit;
}

int32_t BlockManager::num_unheld(const std::vector<int32_t>& blocks) const {
  int32_t n = 0;
  for (int32_t b : blocks) n += refs_[b] == 0;
  return n;
}

void BlockManager::share(BlockTable& table, const std::vector<int32_t>& blocks) {
  if (!table.empty()) throw std::logic_error("share needs an empty block table");
  for (int32_t b : blocks) {
    if (!cached_flag_[b]) throw std::logic_error("sharing block " + std::to_string(b) + " that is not cached");
    if (refs_[b]++ == 0) evictable_.erase(lru_pos_[b]);
    table.push_back(b);
  }
}

void BlockManager::hash_block(const BlockTable& table, const std::vector<int32_t>& tokens, int32_t i) {
  const int32_t b = table[i];
  if (hashed_[b]) return;
  if (i > 0 && !hashed_[table[i - 1]]) throw std::logic_error("blocks are hashed in order");
  if (static_cast<int64_t>(tokens.size()) < static_cast<int64_t>(i + 1) * block_size_)
    throw std::logic_error("only full blocks are hashed");
  const int32_t* t = tokens.data() + static_cast<size_t>(i) * block_size_;
  hash_[b] = block_hash(i > 0 ? hash_[table[i - 1]] : 0, t, block_size_);
  hashed_[b] = 1;
  // An equal block registered by another request stays the one shared; this one stays private (its hash
  // still chains the blocks after it).
  if (!cached_.emplace(hash_[b], b).second) return;
  cached_flag_[b] = 1;
  std::copy(t, t + block_size_, tokens_.begin() + static_cast<size_t>(b) * block_size_);
}

void BlockManager::forget(int32_t b) {
  if (!cached_flag_[b]) return;
  uncache(b);
  if (refs_[b] == 0) {
    evictable_.erase(lru_pos_[b]);
    free_.push_back(b);
  }
}

bool BlockManager::reset_cache() {
  if (static_cast<int32_t>(free_.size() + evictable_.size()) != num_blocks()) return false;
  for (int32_t b : evictable_) {
    uncache(b);
    hashed_[b] = 0;
    kv_[b] = 0;
    free_.push_back(b);
  }
  evictable_.clear();
  return true;
}

}  // namespace rstitch
