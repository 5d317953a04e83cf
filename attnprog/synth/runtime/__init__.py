"""Running programs: the OS-isolated sandbox and its worker, execution, the output cache, packed outputs."""
