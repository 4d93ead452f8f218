"""One file per tab: build(ctx) lays out components and wires events. No torch, no SQL."""
