// The client's end of engramd's shared-memory transport: ShmConnection (the handshake and the
// request ring, engram/shm_connection.h) and MappedTable (a resident table gathered in this
// process, engram/mapped_table.h). Kept so that code including this header goes on building.
#ifndef ENGRAM_CLIENT_SHM_CLIENT_H_
#define ENGRAM_CLIENT_SHM_CLIENT_H_

#include "engram/mapped_table.h"
#include "engram/shm_connection.h"

#endif  // ENGRAM_CLIENT_SHM_CLIENT_H_
