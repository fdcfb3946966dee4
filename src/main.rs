fn main() {
    // Before anything can arm a device: a panic while armed parks the
    // panicking thread rather than unwinding into a close (which pings).
    leasedog::agent::realtime::park_on_panic_while_armed();
    // Devices a previous agent left armed in systemd's fd store come back as
    // LISTEN_FDS: keep them open (a close pings), out of children, unpinged.
    let handed_back = leasedog::watchdog::fdstore::keep_handed_back();
    if !handed_back.is_empty() {
        let names: Vec<String> = handed_back
            .iter()
            .map(|(fd, name)| format!("fd {fd} ({name})"))
            .collect();
        eprintln!(
            "leasedog: systemd handed back {} descriptor(s) from its fd store: {}: watchdog \
             devices a previous agent left ARMED; kept open and never pinged by this agent, so \
             the node resets W after that agent's last ping",
            names.len(),
            names.join(", ")
        );
    }
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    std::process::exit(leasedog::cli::main());
}
