// libFuzzer target for the checkpoint loader. The first byte picks the facade
// kind to load into (as in the seed corpus that test_checkpoint writes); the rest
// is the checkpoint. Loading must either succeed or throw checkpoint_error:
// anything else (a crash, a sanitizer report, another exception, a huge
// allocation) is a finding.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "../support/checkpoint_fixtures.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using galore_test::FacadeKind;
  if (size == 0) return 0;
  const auto kind = static_cast<FacadeKind>(data[0] % static_cast<std::uint8_t>(FacadeKind::Count));
  static galore_test::Fixture* fixtures[4] = {};
  galore_test::Fixture*& f = fixtures[static_cast<int>(kind)];
  if (!f) f = new galore_test::Fixture(kind);  // registered layers and weights, reused across inputs
  const std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    f->load(bytes);
  } catch (const galore::checkpoint_error&) {
  }
  return 0;
}
