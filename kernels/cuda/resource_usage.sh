#!/usr/bin/env bash
# Registers, shared memory, stack and spills of every Engram CUDA kernel for one architecture
# (default sm_90), as a table; exits 1 if any kernel spills. Uses `cuobjdump --dump-resource-usage`
# on the built library when the toolkit has cuobjdump, else ptxas's own report (-Xptxas -v) from
# compiling the same source with the same flags (this machine's toolkit ships no cuobjdump).
#   kernels/cuda/resource_usage.sh BUILD_DIR [ARCH]
set -euo pipefail
BUILD=${1:?usage: resource_usage.sh BUILD_DIR [sm_XX]}
ARCH=${2:-sm_90}
SRC=$(cd "$(dirname "$0")/../.." && pwd)
NVCC=${CUDACXX:-/usr/local/cuda/bin/nvcc}
LIB="$BUILD/kernels/libengram_kernels_cuda.a"
CUOBJDUMP=$(command -v cuobjdump || true)
[ -z "$CUOBJDUMP" ] && [ -x "$(dirname "$NVCC")/cuobjdump" ] && CUOBJDUMP="$(dirname "$NVCC")/cuobjdump"

demangle() { c++filt | sed -E 's/\(anonymous namespace\):://; s/engram::kernels::cuda:://; s/\(.*//'; }

if [ -n "$CUOBJDUMP" ] && [ -f "$LIB" ]; then
  echo "kernel resource usage ($ARCH, cuobjdump --dump-resource-usage $LIB)"
  "$CUOBJDUMP" --dump-resource-usage --gpu-architecture "$ARCH" "$LIB" | awk '
    /Function / { name=$2; sub(":$", "", name) }
    /REG:/ { reg=shared=stack=local="?";
             for (i = 1; i <= NF; i++) { split($i, kv, ":"); if (kv[1]=="REG") reg=kv[2]; if (kv[1]=="SHARED") shared=kv[2];
                                         if (kv[1]=="STACK") stack=kv[2]; if (kv[1]=="LOCAL") local=kv[2] }
             print name, reg, shared, stack, local, local }' > /tmp/engram_kernel_usage.$$
else
  echo "kernel resource usage ($ARCH, ptxas -v on kernels/cuda/engram_kernels.cu; no cuobjdump in this toolkit)"
  "$NVCC" -std=c++20 -O3 -I "$SRC/kernels/include" -gencode "arch=compute_${ARCH#sm_},code=$ARCH" -Xptxas -v \
    -c "$SRC/kernels/cuda/engram_kernels.cu" -o /dev/null 2>&1 | awk '
    /Function properties for/ { name=$NF }
    /bytes stack frame/ { stack=$1; spill=$5 + $9 }
    /Used [0-9]+ registers/ { reg=$5; shared=0; for (i = 1; i <= NF; i++) if ($i == "smem") shared=$(i-2);
                              print name, reg, shared, stack, 0, spill }' > /tmp/engram_kernel_usage.$$
fi
printf "%-22s %6s %12s %8s %12s\n" kernel regs shared_bytes stack spill_bytes
fail=0
while read -r name reg shared stack local spill; do
  printf "%-22s %6s %12s %8s %12s\n" "$(echo "$name" | demangle)" "$reg" "$shared" "$stack" "$spill"
  [ "$spill" != "0" ] && fail=1
done < /tmp/engram_kernel_usage.$$
count=$(wc -l < /tmp/engram_kernel_usage.$$)
rm -f /tmp/engram_kernel_usage.$$
[ "$count" -gt 0 ] || { echo "resource_usage: no kernels found" >&2; exit 1; }
if [ "$fail" = 1 ]; then echo "resource_usage: a kernel spills registers to local memory" >&2; exit 1; fi
echo "resource_usage: $count kernels, no spills"
