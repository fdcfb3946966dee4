fn main() {
    // Before anything can arm a device: a panic while armed parks the
    // panicking thread rather than unwinding into a close (which pings).
    leasedog::agent::realtime::park_on_panic_while_armed();
    std::process::exit(leasedog::cli::main());
}
