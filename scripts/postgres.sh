#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server for tests (the PostgreSQL storage backend, Optuna interop).
#
#   scripts/postgres.sh start DIR PORT   initdb a fresh cluster in DIR, start it on 127.0.0.1:PORT
#                                        (unix socket in DIR), create user hpo (password hpo) and
#                                        database hpo it owns (hpo may CREATEDB: one database per
#                                        test); prints postgresql://hpo:hpo@127.0.0.1:PORT/hpo
#   scripts/postgres.sh restart DIR      fast-restart it (fault tests); prints the URL again
#   scripts/postgres.sh stop DIR         stop it (pg_ctl -m fast) and remove DIR; fine if DIR is gone
#
# stdout carries only the URL, so `url=$(scripts/postgres.sh start "$dir" 55432)` works; progress
# and errors go to stderr, errors as one line starting "postgres.sh: error:".
# As root (CI) the cluster is owned by and runs as the `postgres` OS user (initdb refuses root), so
# every directory above DIR must be traversable by it: pick DIR under /tmp. Otherwise it runs as the
# current user. Binaries: $PG_BIN, default /usr/lib/postgresql/15/bin; when they are missing and we
# are root, `apt-get install -y postgresql` installs them (without Debian's default 5432 cluster).
# The server log is DIR/postgres.log; the data directory DIR/data.
# Python: SQLAlchemy 2.1 maps postgresql:// to psycopg 3; with psycopg2 write postgresql+psycopg2://.
set -euo pipefail

me=postgres.sh
die() { echo "$me: error: $*" >&2; exit 1; }
note() { echo "$me: $*" >&2; }
trap 'die "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

usage="usage: $0 start DIR PORT | restart DIR | stop DIR"
[ $# -ge 2 ] || die "$usage"
cmd=$1
dir=$2
case "$cmd" in
  start) [ $# -eq 3 ] || die "$usage"; port=$3 ;;
  stop | restart) [ $# -eq 2 ] || die "$usage" ;;
  *) die "$usage" ;;
esac
[ -n "$dir" ] || die "DIR is empty"
dir=$(realpath -m -- "$dir")
case "$dir" in
  / | /tmp | /root | /home | /usr | /var | /etc) die "refusing to use $dir as DIR" ;;
esac
[[ "$dir" =~ ^[A-Za-z0-9._/+-]+$ ]] || die "DIR may contain only letters, digits and ._/+- (got $dir)"
cd /   # the postgres user may not be able to enter the caller's directory
data=$dir/data
log=$dir/postgres.log
marker=$dir/.hpo-postgres

# Run as the cluster owner: `postgres` when we are root, else ourselves.
if [ "$(id -u)" -eq 0 ]; then
  owner=postgres
  as_owner() { runuser -u postgres -- "$@"; }
else
  owner=$(id -un)
  as_owner() { "$@"; }
fi

find_bin() {
  PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
  [ -x "$PG_BIN/initdb" ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    note "$PG_BIN/initdb is missing; installing it: apt-get install -y postgresql"
    # Debian's package would otherwise create and start a "main" cluster on port 5432.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/50-hpo-no-main.conf
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } >&2 \
      || die "apt-get install -y postgresql failed"
    [ -x "$PG_BIN/initdb" ] && return 0
    local other
    other=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$other" ] && [ -x "$other/initdb" ]; then
      note "PostgreSQL 15 is not what apt installed; using $other"
      PG_BIN=$other
      return 0
    fi
  fi
  die "no PostgreSQL binaries at $PG_BIN (set PG_BIN, or run as root to apt-get install postgresql)"
}

wait_ready() {   # bounded wait until the server accepts TCP connections
  local p=$1 i
  for i in $(seq 1 60); do
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$p" -d postgres -U postgres -t 2; then
      return 0
    fi
    sleep 0.5
  done
  die "server in $dir does not accept connections on 127.0.0.1:$p after 30 s (see $log)"
}

log_tail() {   # the most telling line of the server log, without its timestamp prefix
  [ -r "$log" ] || return 0
  local line
  line=$(grep -E 'already in use' "$log" | tail -n 1 || true)
  [ -n "$line" ] || line=$(grep -E 'FATAL|PANIC' "$log" | tail -n 1 || true)
  echo "$line" | sed -E 's/^[0-9-]+ [0-9:.]+ [A-Z]+ \[[0-9]+\] //'
}

# Is the postmaster of $data running? Not when postmaster.pid is missing, or names a process that
# is gone or a zombie (a killed server whose parent, e.g. a container's init, has not reaped it:
# pg_ctl would take it for alive and wait for it).
server_alive() {
  local pid state
  [ -f "$data/postmaster.pid" ] || return 1
  pid=$(head -n 1 "$data/postmaster.pid")
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null || echo X)
  [ "$state" != Z ] && [ "$state" != X ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]
}

case "$cmd" in
start)
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65535 ] \
    || die "PORT must be a number in 1024..65535 (got $port)"
  sock="$dir/.s.PGSQL.$port"
  [ ${#sock} -le 107 ] || die "DIR is too long for a unix socket path ($sock); pick a shorter one"
  if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    die "$dir exists and is not empty (an old server? run: $0 stop $dir)"
  fi
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' OS user to run the server as (install postgresql)"
  fi
  find_bin
  t0=$(date +%s%N)
  mkdir -p "$dir"
  chown "$owner" "$dir"
  chmod 700 "$dir"
  as_owner test -w "$dir" -a -x "$dir" \
    || { rmdir "$dir" 2>/dev/null || true
         die "user $owner cannot reach $dir (a directory above it is not traversable); pick DIR under /tmp"; }
  : >"$marker"
  as_owner "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --locale=C --encoding=UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
    || die "initdb failed: $(tail -n 1 "$dir/initdb.log") (see $dir/initdb.log)"
  cat >>"$data/postgresql.conf" <<EOF

# scripts/postgres.sh: a throwaway test server
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
EOF
  echo "$port" >"$dir/port"
  as_owner "$PG_BIN/pg_ctl" -s start -D "$data" -l "$log" -w -t 60 >&2 \
    || die "the server did not start: $(log_tail) (see $log; clean up with: $0 stop $dir)"
  wait_ready "$port"
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres >&2 <<'EOF' \
    || die "could not create user/database hpo (see $log)"
CREATE ROLE hpo LOGIN CREATEDB PASSWORD 'hpo';
CREATE DATABASE hpo OWNER hpo;
EOF
  PGPASSWORD=hpo "$PG_BIN/psql" -X -q -tA -h 127.0.0.1 -p "$port" -U hpo -d hpo -c 'SELECT 1' >/dev/null \
    || die "user hpo cannot log in over TCP on 127.0.0.1:$port"
  note "started in $dir on 127.0.0.1:$port in $((($(date +%s%N) - t0) / 1000000)) ms"
  echo "postgresql://hpo:hpo@127.0.0.1:$port/hpo"
  ;;
restart)
  [ -f "$marker" ] && [ -f "$dir/port" ] || die "$dir is not a server made by $me start"
  find_bin
  port=$(cat "$dir/port")
  if server_alive; then
    as_owner "$PG_BIN/pg_ctl" -s restart -D "$data" -m fast -l "$log" -w -t 60 >&2 \
      || die "the server did not restart: $(log_tail) (see $log)"
  else   # it was killed (a fault test): clear its stale lock files and start it again
    rm -f "$data/postmaster.pid" "$dir"/.s.PGSQL.*
    as_owner "$PG_BIN/pg_ctl" -s start -D "$data" -l "$log" -w -t 60 >&2 \
      || die "the server did not start again: $(log_tail) (see $log)"
  fi
  wait_ready "$port"
  echo "postgresql://hpo:hpo@127.0.0.1:$port/hpo"
  ;;
stop)
  if [ ! -e "$dir" ]; then
    note "$dir does not exist; nothing to stop"
    exit 0
  fi
  [ -f "$marker" ] || die "$dir was not made by $me start; not touching it"
  if server_alive; then
    find_bin
    if ! as_owner "$PG_BIN/pg_ctl" -s stop -D "$data" -m fast -w -t 30 >&2; then
      note "fast shutdown failed; trying immediate"
      as_owner "$PG_BIN/pg_ctl" -s stop -D "$data" -m immediate -w -t 30 >&2 \
        || die "could not stop the server in $dir (pid $(head -n 1 "$data/postmaster.pid"))"
    fi
  fi
  rm -rf -- "$dir"
  ;;
esac
