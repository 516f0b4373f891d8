# Sourced by the scripts run on a CUDA machine: sets KIVI_NVRTC_LIB, unless it is set, to the
# toolkit's NVRTC (it matches the driver), else to the nvidia-cuda-nvrtc Python package's.
if [ -z "${KIVI_NVRTC_LIB:-}" ]; then
  for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then export KIVI_NVRTC_LIB="$d"; break; fi
  done
fi
if [ -z "${KIVI_NVRTC_LIB:-}" ]; then
  d=$(python3 -c 'import nvidia, os
for p in nvidia.__path__:
    for s in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
        d = os.path.join(p, s)
        if os.path.isdir(d) and any(f.startswith("libnvrtc.so") for f in os.listdir(d)):
            print(d); raise SystemExit' 2>/dev/null)
  [ -n "$d" ] && export KIVI_NVRTC_LIB="$d"
fi
