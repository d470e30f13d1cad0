// libFuzzer target for the checkpoint loader's value checks: the input is a
// program of changes to a valid checkpoint (checkpoint_mutator.hpp), applied
// under recomputed checksums. Any property failure aborts, as do the sanitizers'
// reports (the target is built with -fno-sanitize-recover=undefined).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "checkpoint_mutator.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const galore_fuzz::Outcome out = galore_fuzz::run_value_mutation(data, size);
  if (out.bad) {
    std::fprintf(stderr, "fuzz_checkpoint_values: %s\n", out.message.c_str());
    std::abort();
  }
  return 0;
}
