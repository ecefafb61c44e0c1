"""ferry VM runtime: ISA, interpreter, guest RAM, dirty tracking, guest programs, VM process."""
