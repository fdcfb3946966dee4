fn main() {
    std::process::exit(leasedog::cli::main());
}
