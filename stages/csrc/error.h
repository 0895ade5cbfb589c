// What every function of the C++ shim shares: an exception's message copied into the caller's
// buffer (NUL-terminated, at most err_len bytes).
#pragma once
#include <cstddef>
#include <cstring>

namespace pipe_shim {
inline void set_error(const char* what, char* err, size_t err_len) {
  if (err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}
}  // namespace pipe_shim
