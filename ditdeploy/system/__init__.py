"""The process and the machine: signals, alternate stacks, CPU instruction sets, early bounds."""
