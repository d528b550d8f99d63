// `engram-bench socket`: the ceiling for bulk replies over loopback TCP. One connection, one
// request in flight, as a unary gRPC Lookup has it: the client writes an 8-byte request naming the
// reply size, the server thread writes that many bytes from a buffer made once, the client reads
// them into its own buffer. No framing, no serialization, no copies but the kernel's: what a
// transport could at best do with the same bytes on the same machine.
#ifndef ENGRAM_BENCH_SOCKET_CEILING_H_
#define ENGRAM_BENCH_SOCKET_CEILING_H_

namespace engram {

int SocketCeiling(int argc, char** argv);

}  // namespace engram

#endif  // ENGRAM_BENCH_SOCKET_CEILING_H_
