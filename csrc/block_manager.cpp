#include "block_manager.h"

#include <stdexcept>
#include <string>

namespace rstitch {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size) : block_size_(block_size) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive");
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive");
  used_.assign(num_blocks, 0);
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

int32_t BlockManager::missing(const BlockTable& table, int64_t num_tokens) const {
  int32_t need = blocks_for(num_tokens) - static_cast<int32_t>(table.size());
  return need > 0 ? need : 0;
}

void BlockManager::cover(BlockTable& table, int64_t num_tokens) {
  int32_t need = missing(table, num_tokens);
  if (need > num_free())
    throw std::runtime_error("out of KV blocks: need " + std::to_string(need) + ", " +
                             std::to_string(num_free()) + " free");
  for (int32_t i = 0; i < need; ++i) {
    int32_t b = free_.back();
    free_.pop_back();
    used_[b] = 1;
    table.push_back(b);
  }
}

void BlockManager::truncate(BlockTable& table, int64_t num_tokens) {
  size_t keep = static_cast<size_t>(blocks_for(num_tokens));
  while (table.size() > keep) {
    int32_t b = table.back();
    table.pop_back();
    if (b < 0 || b >= num_blocks() || !used_[b])
      throw std::logic_error("freeing block " + std::to_string(b) + " that is not in use");
    used_[b] = 0;
    free_.push_back(b);
  }
}

}  // namespace rstitch
