// Python bindings: plain integers, lists and numpy buffers (the runtime hands in numpy views of pinned
// torch tensors), so the extension builds without torch headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "block_manager.h"
#include "scheduler.h"

namespace py = pybind11;
using namespace rstitch;

namespace {

template <typename T>
using Buffer = std::optional<py::array_t<T, py::array::c_style>>;

template <typename T>
T* writable(Buffer<T>& a, int64_t need, const char* what) {
  if (!a) return nullptr;
  if (a->size() < need)
    throw std::invalid_argument(std::string(what) + " holds " + std::to_string(a->size()) + " items, needs " +
                                std::to_string(need));
  return a->mutable_data();
}

Results results(Buffer<int32_t>& tokens, Buffer<float>& entropies, Buffer<int32_t>& flags) {
  if (!tokens) return {};
  if (!entropies || !flags || entropies->size() < tokens->size() || flags->size() < tokens->size())
    throw std::invalid_argument("results: tokens, entropies and flags must have the same size");
  return {tokens->data(), entropies->data(), flags->data(), static_cast<int64_t>(tokens->size())};
}

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::kStop: return "stop";
    case Finish::kLength: return "length";
    case Finish::kAbort: return "abort";
    case Finish::kError: return "error";
    default: return nullptr;
  }
}

py::dict stats_dict(const Stats& s) {
  py::dict d;
  d["slm_tokens"] = s.slm_tokens;
  d["llm_tokens"] = s.llm_tokens;
  d["switches_to_llm"] = s.switches_to_llm;
  d["switches_to_slm"] = s.switches_to_slm;
  d["discarded_slm_tokens"] = s.discarded_slm_tokens;
  d["extend_tokens_slm"] = s.extend_tokens_slm;
  d["extend_tokens_llm"] = s.extend_tokens_llm;
  d["drafted"] = s.drafted;
  d["accepted"] = s.accepted;
  d["verify_steps"] = s.verify_steps;
  d["preemptions"] = s.preemptions;
  d["stale_rows"] = s.stale_rows;
  d["llm_wait_steps"] = s.llm_wait_steps;
  d["llm_wait_s"] = s.llm_wait_s;
  d["time_slm_s"] = s.time_slm_s;
  d["time_llm_s"] = s.time_llm_s;
  d["prefix_queries"] = s.prefix_queries;
  d["prefix_hits_slm"] = s.prefix_hits[kSLM];
  d["prefix_hits_llm"] = s.prefix_hits[kLLM];
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rstitch-engine native core: block manager, request state machine, step planning";

  m.attr("SLM") = static_cast<int>(kSLM);
  m.attr("LLM") = static_cast<int>(kLLM);
  m.attr("KEEP") = static_cast<int>(kKeep);
  m.attr("NEXT_LLM") = static_cast<int>(kNextLLM);
  m.attr("NAN") = static_cast<int>(kNaN);
  m.attr("ROUTER_FEATURES") = kRouterFeatures;
  py::dict header;
  header["num_rows"] = static_cast<int>(kNumRows);
  header["num_tokens"] = static_cast<int>(kNumTokens);
  header["num_logits"] = static_cast<int>(kNumLogits);
  header["max_seq_len"] = static_cast<int>(kMaxSeqLen);
  header["max_query_len"] = static_cast<int>(kMaxQueryLen);
  header["any_top_k_top_p"] = static_cast<int>(kAnyTopKTopP);
  header["any_router"] = static_cast<int>(kAnyRouter);
  header["any_verify"] = static_cast<int>(kAnyVerify);
  header["any_sampling"] = static_cast<int>(kAnySampling);
  header["any_draft"] = static_cast<int>(kAnyDraft);
  m.attr("HEADER") = header;

  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int32_t, int32_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free", &BlockManager::num_free)
      .def("blocks_for", &BlockManager::blocks_for)
      .def("can_cover", &BlockManager::can_cover)
      .def("cover", [](BlockManager& b, BlockTable t, int64_t n) { b.cover(t, n); return t; })
      .def("truncate", [](BlockManager& b, BlockTable t, int64_t n) { b.truncate(t, n); return t; })
      .def("release", [](BlockManager& b, BlockTable t) { b.release(t); return t; })
      .def("slot", &BlockManager::slot)
      .def_property_readonly("num_cached", &BlockManager::num_cached)
      .def("match", &BlockManager::match, py::arg("tokens"), py::arg("limit"))
      .def("share", [](BlockManager& b, const std::vector<int32_t>& blocks) {
        BlockTable t;
        b.share(t, blocks);
        return t;
      })
      .def("hash_block", &BlockManager::hash_block, py::arg("table"), py::arg("tokens"), py::arg("index"))
      .def("is_cached", &BlockManager::is_cached)
      .def("has_kv", &BlockManager::has_kv)
      .def("set_kv", &BlockManager::set_kv)
      .def("forget", &BlockManager::forget)
      .def("reset_cache", &BlockManager::reset_cache);

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init<>())
      .def_readwrite("num_blocks", &SchedulerConfig::num_blocks)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readwrite("max_model_len", &SchedulerConfig::max_model_len)
      .def_readwrite("max_step_tokens", &SchedulerConfig::max_step_tokens)
      .def_readwrite("max_logits_rows", &SchedulerConfig::max_logits_rows)
      .def_readwrite("has_model", &SchedulerConfig::has_model)
      .def_readwrite("vocab_size", &SchedulerConfig::vocab_size)
      .def_readwrite("max_inflight", &SchedulerConfig::max_inflight)
      .def_readwrite("optimistic_llm", &SchedulerConfig::optimistic_llm)
      .def_readwrite("watermark_blocks", &SchedulerConfig::watermark_blocks)
      .def_readwrite("llm_min_batch", &SchedulerConfig::llm_min_batch)
      .def_readwrite("llm_batch_share", &SchedulerConfig::llm_batch_share)
      .def_readwrite("llm_max_wait", &SchedulerConfig::llm_max_wait)
      .def_readwrite("prefix_caching", &SchedulerConfig::prefix_caching);

  py::class_<RequestSpec>(m, "RequestSpec")
      .def(py::init<>())
      .def_readwrite("id", &RequestSpec::id)
      .def_readwrite("prompt", &RequestSpec::prompt)
      .def_readwrite("max_tokens", &RequestSpec::max_tokens)
      .def_readwrite("min_tokens", &RequestSpec::min_tokens)
      .def_readwrite("stop_ids", &RequestSpec::stop_ids)
      .def_readwrite("temperature", &RequestSpec::temperature)
      .def_readwrite("top_p", &RequestSpec::top_p)
      .def_readwrite("top_k", &RequestSpec::top_k)
      .def_readwrite("seed", &RequestSpec::seed)
      .def_readwrite("start_model", &RequestSpec::start_model)
      .def_readwrite("tau_up", &RequestSpec::tau_up)
      .def_readwrite("tau_down", &RequestSpec::tau_down)
      .def_readwrite("handover_after", &RequestSpec::handover_after)
      .def_readwrite("min_llm_run", &RequestSpec::min_llm_run)
      .def_readwrite("forced", &RequestSpec::forced)
      .def_readwrite("use_router", &RequestSpec::use_router)
      .def_readwrite("spec_k", &RequestSpec::spec_k)
      .def_readwrite("accept_rate", &RequestSpec::accept_rate)
      .def_readwrite("skip_prefix_cache", &RequestSpec::skip_prefix_cache);

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&>())
      .def("layout",
           [](const Scheduler& s) {
             py::list out;
             for (const auto& f : s.layout().fields)
               out.append(py::make_tuple(f.name, std::string(1, f.type), f.offset, f.length));
             return out;
           })
      .def_property_readonly("i32_size", [](const Scheduler& s) { return s.layout().i32_size; })
      .def_property_readonly("f32_size", [](const Scheduler& s) { return s.layout().f32_size; })
      .def_property_readonly("max_rows", [](const Scheduler& s) { return s.layout().max_rows; })
      .def_property_readonly("table_update_size", [](const Scheduler& s) { return s.table_layout().size(); })
      .def_property_readonly("table_update_capacity", [](const Scheduler& s) { return s.table_layout().capacity; })
      .def_property_readonly("max_blocks_per_seq", &Scheduler::max_blocks_per_seq)
      .def_property_readonly("block_size", [](const Scheduler& s) { return s.config().block_size; })
      .def_property_readonly("num_free_blocks", [](const Scheduler& s) { return s.blocks().num_free(); })
      .def_property_readonly("num_blocks", [](const Scheduler& s) { return s.blocks().num_blocks(); })
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("llm_steps", &Scheduler::llm_steps)
      .def_property_readonly("llm_step_rows", &Scheduler::llm_step_rows)
      .def("set_parking", &Scheduler::set_parking, py::arg("llm_min_batch"), py::arg("llm_batch_share"),
           py::arg("llm_max_wait"))
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("add", &Scheduler::add)
      .def("abort", [](Scheduler& s, int64_t id) { s.finish(id, Finish::kAbort); })
      .def("finish_stop", [](Scheduler& s, int64_t id) { s.finish(id, Finish::kStop); })
      .def("fail", [](Scheduler& s, int64_t id, const std::string& why) { s.finish(id, Finish::kError, why); })
      .def("reset_prefix_cache", &Scheduler::reset_prefix_cache)
      .def_property_readonly("num_cached_blocks", [](const Scheduler& s) { return s.blocks().num_cached(); })
      .def("plan",
           [](Scheduler& s, int64_t step, Buffer<int32_t> slm_i32, Buffer<float> slm_f32, Buffer<int32_t> llm_i32,
              Buffer<float> llm_f32, py::array_t<int32_t, py::array::c_style> table_updates) {
             const auto& L = s.layout();
             std::array<PlanBuffers, 2> bufs{
                 PlanBuffers{writable(slm_i32, L.i32_size, "SLM int32 plan"), writable(slm_f32, L.f32_size, "SLM float plan")},
                 PlanBuffers{writable(llm_i32, L.i32_size, "LLM int32 plan"), writable(llm_f32, L.f32_size, "LLM float plan")}};
             if (table_updates.size() < s.table_layout().size())
               throw std::invalid_argument("table update buffer too small");
             return s.plan(step, bufs, table_updates.mutable_data());
           })
      .def("commit",
           [](Scheduler& s, int64_t step, Buffer<int32_t> slm_tok, Buffer<float> slm_ent, Buffer<int32_t> slm_flags,
              Buffer<int32_t> llm_tok, Buffer<float> llm_ent, Buffer<int32_t> llm_flags, double slm_s, double llm_s) {
             auto events = s.commit(step, {results(slm_tok, slm_ent, slm_flags), results(llm_tok, llm_ent, llm_flags)},
                                    {slm_s, llm_s});
             py::list out;
             for (auto& e : events) {
               const char* f = finish_name(e.finish);
               out.append(py::make_tuple(e.id, py::cast(e.new_tokens), py::cast(e.new_sources),
                                         py::cast(e.new_entropies), f ? py::str(f) : py::object(py::none())));
             }
             return out;
           })
      .def("output",
           [](const Scheduler& s, int64_t id) {
             const Request& r = s.request(id);
             py::dict d;
             d["token_ids"] = std::vector<int32_t>(r.tokens.begin() + r.n_prompt, r.tokens.end());
             d["sources"] = std::vector<int32_t>(r.sources.begin(), r.sources.end());
             d["entropies"] = r.entropies;
             d["routed"] = r.routed;
             const char* f = finish_name(r.finish);
             d["finish_reason"] = f ? py::str(f) : py::object(py::none());
             d["error"] = r.error;
             d["stats"] = stats_dict(r.stats);
             d["num_prompt_tokens"] = r.n_prompt;
             d["filled"] = r.filled;
             d["active"] = r.active;
             std::vector<std::tuple<int32_t, int32_t, int32_t>> trace;
             for (const auto& t : r.trace) trace.emplace_back(t.model, t.new_tokens, t.cached_tokens);
             d["trace"] = trace;
             return d;
           })
      .def("release", &Scheduler::release)
      .def("take_finished", &Scheduler::take_finished)
      .def("take_started", &Scheduler::take_started);
}
