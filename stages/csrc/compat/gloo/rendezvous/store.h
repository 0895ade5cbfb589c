// pipe: compatibility header for stages/csrc/dist.cpp (c10d through the C++ shim).
// Why it exists: the pip torch wheel ships c10d's ProcessGroupGloo.hpp but not the gloo headers
// it includes, although gloo itself is compiled into libtorch_cpu.so. These minimal
// declarations (ours, not gloo's) let that header compile; dist.cpp only ever holds gloo
// objects through pointers that libtorch creates. dist.cpp static_asserts the sizes of the
// c10d classes it constructs (checked against libtorch's own `operator new` sizes), a
// tripwire for torch upgrades. Only dist.cpp's compile unit sees this folder (build.rs).
//
// Compat stub for the Store interface that c10d's GlooStore derives from.
// Virtual functions are declared in the same order as in the gloo that
// torch 2.11 was built with (IStore base + rendezvous::Store; libtorch's
// GlooStore vtable has 12 slots, consistent with this order), but NONE is
// defined here: if our TU ever emitted the Store/GlooStore vtable (i.e.
// constructed a GlooStore), linking fails with undefined gloo::IStore /
// gloo::rendezvous::Store symbols instead of silently interposing a
// mismatched weak vtable over libtorch's.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#define GLOO_STORE_HAS_STORE_V2 1

namespace gloo {

class IStore {
 public:
  virtual ~IStore();
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual std::vector<char> wait_get(
      const std::string& key, const std::chrono::milliseconds& timeout);
  virtual void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) = 0;
  virtual bool has_v2_support() = 0;
  virtual std::vector<std::vector<char>> multi_get(
      const std::vector<std::string>& keys) = 0;
  virtual void multi_set(
      const std::vector<std::string>& keys,
      const std::vector<std::vector<char>>& values) = 0;
  virtual void append(const std::string& key, const std::vector<char>& value) = 0;
  virtual int64_t add(const std::string& key, int64_t value) = 0;
};

namespace rendezvous {
class Store : public IStore {
 public:
  ~Store() override;
  void set(const std::string& key, const std::vector<char>& data) override = 0;
  std::vector<char> get(const std::string& key) override = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;
  bool has_v2_support() override;
  std::vector<std::vector<char>> multi_get(
      const std::vector<std::string>& keys) override;
  void multi_set(const std::vector<std::string>& keys,
                 const std::vector<std::vector<char>>& values) override;
  void append(const std::string& key, const std::vector<char>& value) override;
  int64_t add(const std::string& key, int64_t value) override;
};
} // namespace rendezvous
} // namespace gloo
