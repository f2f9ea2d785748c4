# Sourced by the device-run scripts: `step NAME LIMIT CMD...` runs CMD into $OUT/NAME.txt with at most LIMIT
# seconds, or what is left of $BUDGET since $START, and prints the last $TAIL lines (default 25).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
START=${START:-$(date +%s)}
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped (budget)"; return; fi
  echo "== $name (at most $limit s, at $(( $(date +%s) - START )) s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $?" >> "$OUT/$name.txt"
  tail -n "${TAIL:-25}" "$OUT/$name.txt"
}
