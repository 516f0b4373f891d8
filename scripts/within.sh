# Sourced by the scripts run on a CUDA machine in one call of limited time. They set TOTAL_S (the
# run's seconds) and START ($SECONDS at its start), and open fd 3 on their own stderr.
#
# within WANT KEEP CMD...: runs CMD under a timeout of WANT seconds, or less, so that KEEP
# seconds of TOTAL_S are left for the steps after it; skipped (status 124) when under 10 would
# remain.
within() {
  local want=$1 keep=$2
  shift 2
  local left=$((TOTAL_S - (SECONDS - START) - keep))
  ((left < want)) && want=$left
  if ((want < 10)); then
    echo "skipped (the run's $TOTAL_S seconds are spent): $*" >&3
    return 124
  fi
  timeout "$want" "$@"
}
