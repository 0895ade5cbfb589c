// pipe: compatibility header for stages/csrc/dist.cpp (c10d through the C++ shim).
// Why it exists: the pip torch wheel ships c10d's ProcessGroupGloo.hpp but not the gloo headers
// it includes, although gloo itself is compiled into libtorch_cpu.so. These minimal
// declarations (ours, not gloo's) let that header compile; dist.cpp only ever holds gloo
// objects through pointers that libtorch creates. dist.cpp static_asserts the sizes of the
// c10d classes it constructs (checked against libtorch's own `operator new` sizes), a
// tripwire for torch upgrades. Only dist.cpp's compile unit sees this folder (build.rs).
//
// Compat stub: ProcessGroupGloo.hpp includes this but uses nothing from it.
#pragma once
