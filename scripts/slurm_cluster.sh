#!/usr/bin/env bash
# Single-node SLURM cluster for CI and local end-to-end tests (Debian 12, run as root, no systemd).
#
# Usage: scripts/slurm_cluster.sh start|stop|status
#
#   start   install the Debian packages if missing (apt), write /etc/slurm/slurm.conf, start munged,
#           slurmctld and slurmd in the background and wait until the node is idle.
#           If the cluster is already running this is a no-op.
#   stop    cancel any jobs still known to slurmctld, then signal the daemons together by the PIDs
#           recorded at start (SIGTERM, SIGKILL after a grace period). Safe when nothing runs.
#   status  show the daemons, sinfo and squeue. Exit 0 running, 3 stopped, 1 partially running.
#
# Environment:
#   QE_FACTORY_SLURM_STATE        state dir for PID files and logs (default /var/run/qe_factory_slurm)
#   QE_FACTORY_SLURM_TIMEOUT      seconds to wait for the node to become idle (default 30)
#   QE_FACTORY_SLURM_MEM_RESERVE  MB of real memory not offered to jobs (default 512)
#
# Settings follow a trial of Debian 12 slurm-wlm 22.05 without systemd (see README, "SLURM").

set -euo pipefail

STATE_DIR="${QE_FACTORY_SLURM_STATE:-/var/run/qe_factory_slurm}"
IDLE_TIMEOUT="${QE_FACTORY_SLURM_TIMEOUT:-30}"
MEM_RESERVE_MB="${QE_FACTORY_SLURM_MEM_RESERVE:-512}"

PACKAGES=(slurmctld slurmd slurm-client munge)
DAEMONS=(munged slurmctld slurmd)      # start order; stop signals all of them together

SLURM_CONF=/etc/slurm/slurm.conf
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
MUNGE_RUN=/run/munge
SLURM_RUN=/run/slurm
MUNGE_KEY=/etc/munge/munge.key

PROG="$(basename "$0")"

log() { printf '[%s] %s\n' "$PROG" "$*"; }
die() { printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    echo "Usage: $PROG start|stop|status" >&2
    exit 2
}

pidfile_of() { echo "$STATE_DIR/$1.pid"; }

# True if process $1 exists and is not a zombie. PID 1 on these machines is not an init that reaps
# orphans at once: a dead daemon stays a zombie (still named like the daemon) for a second or two.
pid_alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

# Print the recorded PID of daemon $1 if that process is alive and is really that daemon.
live_pid() {
    local name="$1" pidfile pid comm
    pidfile="$(pidfile_of "$name")"
    [[ -r "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name" ]] || return 1
    pid_alive "$pid" || return 1
    echo "$pid"
}

node_name() { hostname -s; }

# Node state as printed by sinfo (e.g. idle, mixed, allocated, down*, idle~); empty if slurmctld does not answer.
node_state() {
    timeout 5 sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n1 || true
}

# ---------------------------------------------------------------------------------------------- install

packages_missing() {
    local pkg missing=()
    for pkg in "${PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    echo "${missing[*]}"
}

install_packages() {
    local missing
    missing="$(packages_missing)"
    [[ -z "$missing" ]] && return 0

    log "installing missing packages: $missing"
    # Package scripts must not start daemons we would not track: forbid service starts during the
    # install unless a policy-rc.d is already in place (as in Docker-style images).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    local apt_log="$STATE_DIR/apt.log" rc=0
    local -a apt_install=(apt-get install -y -q --no-install-recommends)
    # shellcheck disable=SC2086  # $missing is a space-separated package list
    if ! DEBIAN_FRONTEND=noninteractive "${apt_install[@]}" $missing >"$apt_log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        # shellcheck disable=SC2086
        { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
          DEBIAN_FRONTEND=noninteractive "${apt_install[@]}" $missing; } >>"$apt_log" 2>&1 || rc=$?
    fi
    if ((made_policy)); then rm -f "$policy"; fi
    if ((rc != 0)); then
        tail -n 20 "$apt_log" >&2
        die "package installation failed (full log: $apt_log)"
    fi
    missing="$(packages_missing)"
    [[ -z "$missing" ]] || die "packages still missing after apt-get install: $missing (log: $apt_log)"
}

# ---------------------------------------------------------------------------------------------- configure

prepare_dirs() {
    install -d -m 0755 -o munge -g munge "$MUNGE_RUN"
    install -d -m 0755 -o slurm -g slurm "$SLURM_RUN"
    install -d -m 0755 -o slurm -g slurm "$CTLD_SPOOL"
    install -d -m 0755 -o root -g root "$SLURMD_SPOOL"
    install -d -m 0755 -o slurm -g slurm "$STATE_DIR/log"
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        install -d -m 0700 -o munge -g munge "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY"
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
}

write_config() {
    local host node_line real_mem mem
    host="$(node_name)"
    # First line of `slurmd -C` is the node definition for this machine (CPUs, sockets, cores, RealMemory).
    node_line="$(slurmd -C | head -n1)"
    [[ "$node_line" == NodeName=* ]] || die "unexpected output of 'slurmd -C': $node_line"
    real_mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
    [[ -n "$real_mem" ]] || die "no RealMemory in 'slurmd -C' output: $node_line"
    mem=$((real_mem - MEM_RESERVE_MB))
    ((mem >= 256)) || mem=256
    node_line="${node_line/RealMemory=$real_mem/RealMemory=$mem} NodeAddr=127.0.0.1 State=UNKNOWN"

    local tmp
    tmp="$(mktemp "$STATE_DIR/slurm.conf.XXXXXX")"
    cat >"$tmp" <<EOF
# Generated by qe_factory scripts/slurm_cluster.sh -- single-node test cluster. Edits are overwritten.
ClusterName=qefactory
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
# pgid, not linuxproc: linuxproc finds a job's processes by walking /proc, and with the test suite's process churn
# beside it the worker of a job at its time limit went without SLURM's SIGTERM until the SIGKILL 30 s later
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MailProg=/bin/true
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$SLURM_RUN/slurmctld.pid
SlurmdPidFile=$SLURM_RUN/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.log
$node_line
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
EOF
    chmod 0644 "$tmp"
    if [[ -f "$SLURM_CONF" ]] && cmp -s "$tmp" "$SLURM_CONF"; then
        rm -f "$tmp"
        return 1   # unchanged
    fi
    install -d -m 0755 "$(dirname "$SLURM_CONF")"
    mv -f "$tmp" "$SLURM_CONF"
    log "wrote $SLURM_CONF"
    return 0
}

# ---------------------------------------------------------------------------------------------- start / stop

# Run "$@" in the background, detached from this shell's session, output to $STATE_DIR/log/<name>.out,
# and record the daemon's PID (the shell that `exec`s into it keeps its PID) in $STATE_DIR/<name>.pid.
launch() {
    local name="$1" pidfile out; shift
    pidfile="$(pidfile_of "$name")"
    out="$STATE_DIR/log/$name.out"
    rm -f "$pidfile"
    # shellcheck disable=SC2016  # $$ and $@ expand in the child shell
    setsid -f bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" "$@" </dev/null >>"$out" 2>&1 9>&-
    wait_for 5 test -s "$pidfile" || die "could not start $name (see $out)"
}

now_ms() { local t="${EPOCHREALTIME/[.,]/}"; echo "${t%???}"; }

elapsed() { local ms=$(($(now_ms) - $1)); printf '%d.%02d s' $((ms / 1000)) $((ms % 1000 / 10)); }

wait_for() {   # wait_for <seconds> <command...>: poll every 0.05 s until the command succeeds
    local deadline=$(($(now_ms) + $1 * 1000)); shift
    until "$@"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.05
    done
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
# slurmctld listens on its port (6817 = 0x1AA1). Polling this first avoids sinfo's built-in 1 s retry
# sleep when it is called before slurmctld accepts connections.
ctld_listening() { grep -qsE '^ *[0-9]+: [0-9A-F]+:1AA1 [0-9A-F]+:0000 0A ' /proc/net/tcp /proc/net/tcp6; }
node_idle() { ctld_listening && [[ "$(node_state)" == idle ]]; }

print_logs_hint() {
    log "logs: $STATE_DIR/log/{slurmctld,slurmd}.log (daemon stdout/stderr: $STATE_DIR/log/*.out," \
        "munged: /var/log/munge/munged.log, finished jobs: $STATE_DIR/log/jobcomp.log)"
}

dump_logs() {
    local f n
    # The *.out files get what a daemon prints before it opens its log file (e.g. config errors).
    for f in munged.out:5 slurmctld.out:5 slurmd.out:5 slurmctld.log:25 slurmd.log:25; do
        n="${f#*:}"; f="$STATE_DIR/log/${f%:*}"
        [[ -s "$f" ]] || continue
        echo "----- tail -n $n $f" >&2
        tail -n "$n" "$f" >&2
    done
}

# PIDs of untracked live processes named $1 (e.g. started by hand or by a package script).
foreign_pids() {
    local name="$1" mine pid out=()
    mine="$(live_pid "$name" || true)"
    for pid in $(pgrep -x "$name" || true); do
        [[ "$pid" != "$mine" ]] && pid_alive "$pid" && out+=("$pid")
    done
    echo "${out[*]}"
}

running_count() {
    local d n=0
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" >/dev/null && n=$((n + 1))
    done
    echo "$n"
}

cmd_start() {
    local t0
    t0="$(now_ms)"
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 600 9 || die "could not lock $STATE_DIR/lock"

    local n
    n="$(running_count)"
    if ((n == ${#DAEMONS[@]})); then
        local st
        st="$(node_state)"
        if [[ "$st" =~ ^(idle|mixed|allocated|completing)$ ]] && ! write_config; then
            log "already running (node $(node_name): $st); nothing to do"
            print_logs_hint
            return 0
        fi
        log "daemons run but node state is '${st:-no answer}' or the configuration changed; restarting"
        stop_daemons
    elif ((n > 0)); then
        log "only $n of ${#DAEMONS[@]} daemons run; restarting all"
        stop_daemons
    fi

    install_packages
    prepare_dirs
    write_config || true

    local d foreign
    for d in "${DAEMONS[@]}"; do
        foreign="$(foreign_pids "$d")"
        [[ -z "$foreign" ]] || die "an untracked $d is already running (PID $foreign); stop it first"
    done

    launch munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
    wait_for 10 munge_ok || { dump_logs; stop_daemons; die "munged did not come up"; }
    launch slurmctld slurmctld -D
    # slurmd started before slurmctld listens retries its registration only after 1 s: wait for the port.
    wait_for 10 ctld_listening || true
    launch slurmd slurmd -D

    if ! wait_for "$IDLE_TIMEOUT" node_idle; then
        local st
        st="$(node_state)"
        # A node left drained/down in the saved state (e.g. after a crash) does not come back by itself.
        if [[ "$st" =~ ^(down|drain|drained|draining) ]]; then
            log "node is '$st'; resuming it"
            scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true
            wait_for 10 node_idle && st=idle
        fi
        if [[ "$st" != idle ]]; then
            echo "[$PROG] ERROR: node $(node_name) did not become idle within ${IDLE_TIMEOUT}s" \
                 "(state: '${st:-slurmctld does not answer}')" >&2
            dump_logs
            stop_daemons
            die "SLURM start failed; logs in $STATE_DIR/log"
        fi
    fi
    log "SLURM is up: node $(node_name) idle, partition debug; PIDs" \
        "munged=$(live_pid munged) slurmctld=$(live_pid slurmctld) slurmd=$(live_pid slurmd)" \
        "($(elapsed "$t0"))"
    print_logs_hint
}

# Signal all recorded daemons together; SIGKILL whatever is left after the grace period.
stop_daemons() {
    local d pid pids=()
    for d in "${DAEMONS[@]}"; do
        if pid="$(live_pid "$d")"; then pids+=("$pid"); fi
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        local deadline=$((SECONDS + 15)) alive
        while :; do
            alive=()
            for pid in "${pids[@]}"; do
                pid_alive "$pid" && alive+=("$pid")
            done
            ((${#alive[@]})) || break
            if ((SECONDS >= deadline)); then
                log "still alive after SIGTERM, sending SIGKILL: ${alive[*]}"
                kill -KILL "${alive[@]}" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    fi
    for d in "${DAEMONS[@]}"; do rm -f "$(pidfile_of "$d")"; done
    return 0
}

cancel_jobs() {
    live_pid slurmctld >/dev/null || return 0
    local jobs
    jobs="$(timeout 5 squeue -h -o %A -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING 2>/dev/null | xargs || true)"
    [[ -n "$jobs" ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    # Give slurmd time to kill the job steps (SIGTERM, SIGKILL after KillWait=30).
    wait_for 45 no_active_jobs || log "some jobs did not finish cancelling: $(squeue -h -o %A 2>/dev/null | xargs)"
}

no_active_jobs() {
    [[ -z "$(timeout 5 squeue -h -o %A -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING 2>/dev/null)" ]]
}

no_slurmstepd() { [[ -z "$(foreign_pids slurmstepd)" ]]; }

cmd_stop() {
    if [[ ! -d "$STATE_DIR" ]]; then
        log "not running (no state dir $STATE_DIR)"
        return 0
    fi
    exec 9>"$STATE_DIR/lock"
    flock -w 600 9 || die "could not lock $STATE_DIR/lock"
    if (($(running_count) == 0)); then
        for d in "${DAEMONS[@]}"; do rm -f "$(pidfile_of "$d")"; done
        log "not running"
        return 0
    fi
    local t0
    t0="$(now_ms)"
    cancel_jobs
    stop_daemons
    wait_for 10 no_slurmstepd || log "warning: slurmstepd processes remain: $(foreign_pids slurmstepd)"
    log "stopped ($(elapsed "$t0"))"
}

cmd_status() {
    local d pid n=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(live_pid "$d")"; then
            printf '%-10s running  PID %s\n' "$d" "$pid"
            n=$((n + 1))
        else
            printf '%-10s stopped\n' "$d"
        fi
    done
    echo "state dir: $STATE_DIR"
    if ((n == 0)); then
        return 3
    fi
    if live_pid slurmctld >/dev/null; then
        echo "--- sinfo"
        timeout 5 sinfo -N -o '%N %P %T %c %m' 2>&1 || true
        echo "--- squeue"
        timeout 5 squeue 2>&1 || true
    fi
    ((n == ${#DAEMONS[@]})) || return 1
    return 0
}

main() {
    [[ $# -eq 1 ]] || usage
    [[ $EUID -eq 0 ]] || die "must run as root"
    case "$1" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *) usage ;;
    esac
}

main "$@"
