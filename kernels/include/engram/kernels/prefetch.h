// A read prefetch the compiler keeps. GCC 12 deletes __builtin_prefetch calls that sit in a small
// inlined function or lambda (its IPA mod/ref analysis takes them for calls without effect, and
// -fno-ipa-modref brings them back): the row gather then waited on each row's miss in turn and ran
// 3x slower for 128-byte rows (bench/RESULTS.md, "The prefetch GCC deleted"). On x86 the
// instruction is written out as volatile asm, which no pass removes; elsewhere the builtin.
// tests/check_prefetch.sh checks the built gathers still hold the instruction.
#ifndef ENGRAM_KERNELS_PREFETCH_H_
#define ENGRAM_KERNELS_PREFETCH_H_

namespace engram::kernels {

inline void PrefetchForRead(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_PREFETCH_H_
