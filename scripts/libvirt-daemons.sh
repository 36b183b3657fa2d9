#!/usr/bin/env bash
# Start or stop the libvirt daemons (virtlogd, libvirtd) on a machine without systemd.
#
# Usage:
#   scripts/libvirt-daemons.sh start PIDFILE
#       Start virtlogd and libvirtd unless they already run, then wait until
#       `virsh -c qemu:///system version` answers. PIDFILE gets one line
#       "NAME PID STARTTIME" per daemon that THIS call started (read from the
#       daemon's own pidfile); a daemon found running is left alone and not
#       recorded, so a second `start` changes nothing.
#   scripts/libvirt-daemons.sh stop PIDFILE
#       Stop exactly the daemons listed in PIDFILE (TERM, then KILL after about
#       10 s), each only if its pid is still that same process (name and start
#       time in /proc), then remove PIDFILE. Never kills anything by name.
#
# Start and stop calls are serialised by a lock file, so two test sessions
# starting at once do not both start libvirtd.
#
# Every failure prints one line "libvirt: WHAT; WHAT TO DO" (the ERR trap names
# any command that fails without a check of its own).
set -Eeuo pipefail
trap 'echo "libvirt: failed (exit $?): $BASH_COMMAND (scripts/libvirt-daemons.sh line $LINENO); fix that and run it again" >&2' ERR

LOCK=/run/lock/vmtree-libvirt-daemons.lock
READY_TIMEOUT=30
STOP_TIMEOUT=10
URI=qemu:///system

usage() {
  echo "usage: $0 start|stop PIDFILE" >&2
  exit 2
}

[ $# -eq 2 ] || usage
action=$1
pidfile=$2

# -- what a daemon is --------------------------------------------------------

daemon_socket() {
  case $1 in
    virtlogd) echo /run/libvirt/virtlogd-sock ;;
    libvirtd) echo /run/libvirt/libvirt-sock ;;
  esac
}

daemon_pidfile() {
  echo "/run/$1.pid"
}

# The start time of a process (field 22 of /proc/PID/stat, clock ticks since
# boot): with the name, it tells a pid from a later process that reused it.
starttime() {
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  # shellcheck disable=SC2086
  set -- $rest
  echo "${20}"
}

# Whether pid $2 is a live process named $1.
is_daemon() {
  local name=$1 pid=$2 comm
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$name" ]
}

socket_answers() {
  local sock=$1
  [ -S "$sock" ] || return 1
  /usr/bin/python3 - "$sock" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(2)
s.connect(sys.argv[1])
s.close()
EOF
}

# The pid in the daemon's own pidfile, if it names a live process of that name.
pid_from_pidfile() {
  local name=$1 pid
  pid=$(head -n 1 "$(daemon_pidfile "$name")" 2>/dev/null | tr -dc 0-9) || true
  [ -n "$pid" ] && is_daemon "$name" "$pid" || return 1
  echo "$pid"
}

is_running() {
  local name=$1
  pid_from_pidfile "$name" >/dev/null && return 0
  socket_answers "$(daemon_socket "$name")"
}

# -- start ---------------------------------------------------------------------

start_daemon() {
  local name=$1 errors pid deadline st
  if is_running "$name"; then
    echo "libvirt: $name already running"
    return 0
  fi
  errors=$(mktemp)
  # fd 9 (the lock) closed for the daemon: it must not hold the lock for ever.
  # Its output goes to a file, not to our caller's pipes (which would then stay open).
  if ! "$name" -d 9>&- </dev/null >"$errors" 2>&1; then
    echo "libvirt: could not start $name: $(tr '\n' ' ' <"$errors"); run \`$name\` in the foreground to see why" >&2
    rm -f "$errors"
    return 1
  fi
  rm -f "$errors"
  deadline=$((SECONDS + 10))
  until pid=$(pid_from_pidfile "$name"); do
    if [ $SECONDS -ge $deadline ]; then
      echo "libvirt: $name -d returned but $(daemon_pidfile "$name") names no live $name; run \`$name\` in the foreground to see why" >&2
      return 1
    fi
    sleep 0.1
  done
  st=$(starttime "$pid")
  echo "$name $pid $st" >>"$pidfile"
  echo "libvirt: started $name (pid $pid)"
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT)) out
  while true; do
    if out=$(timeout 10 virsh -c "$URI" version 2>&1); then
      return 0
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "libvirt: $URI did not answer within ${READY_TIMEOUT} s: $out; run \`libvirtd\` in the foreground to see why" >&2
      return 1
    fi
    sleep 0.2
  done
}

do_start() {
  mkdir -p "$(dirname "$pidfile")"
  for name in virtlogd libvirtd; do
    command -v "$name" >/dev/null || {
      echo "libvirt: $name is not installed (apt-get install libvirt-daemon-system)" >&2
      exit 1
    }
  done
  # Each says why itself when it fails; `|| exit` keeps the ERR trap from saying it twice.
  start_daemon virtlogd || exit 1
  start_daemon libvirtd || exit 1
  wait_ready || exit 1
}

# -- stop ----------------------------------------------------------------------

# Whether pid $2 is still the process named $1 that started at $3.
same_process() {
  local name=$1 pid=$2 st=$3 now
  is_daemon "$name" "$pid" || return 1
  now=$(starttime "$pid") || return 1
  [ -z "$st" ] || [ "$now" = "$st" ]
}

stop_daemon() {
  local name=$1 pid=$2 st=$3 deadline
  if ! same_process "$name" "$pid" "$st"; then
    if [ -d "/proc/$pid" ]; then
      echo "libvirt: $name (pid $pid) is gone; that pid is another process now: left alone"
    else
      echo "libvirt: $name (pid $pid) is already gone"
    fi
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while same_process "$name" "$pid" "$st"; do
    if [ $SECONDS -ge $deadline ]; then
      echo "libvirt: $name (pid $pid) ignored TERM for ${STOP_TIMEOUT} s: KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
  done
  echo "libvirt: stopped $name (pid $pid)"
}

do_stop() {
  if [ ! -e "$pidfile" ]; then
    echo "libvirt: $pidfile does not exist: nothing to stop"
    return 0
  fi
  # Last started, first stopped: libvirtd before the virtlogd it logs through.
  local lines=() i name pid st
  mapfile -t lines <"$pidfile"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid st <<<"${lines[i]}" || true
    case $name in
      virtlogd | libvirtd) stop_daemon "$name" "$pid" "${st:-}" ;;
      "") ;;
      *) echo "libvirt: ignoring unknown line in $pidfile: ${lines[i]}" >&2 ;;
    esac
  done
  rm -f "$pidfile"
}

# ---------------------------------------------------------------------------------

mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock 9

case $action in
  start) do_start ;;
  stop) do_stop ;;
  *) usage ;;
esac
