// F_SEAL_FUTURE_WRITE (Linux 5.1): the seal that refuses every new writable mapping and write() of
// a memfd while the mappings made before it stay. Older libc headers lack the name.
#ifndef ENGRAM_TIERING_MEMFD_SEALS_H_
#define ENGRAM_TIERING_MEMFD_SEALS_H_

#include <fcntl.h>

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

#endif  // ENGRAM_TIERING_MEMFD_SEALS_H_
