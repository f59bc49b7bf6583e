"""Pure tensor functions for the MoE hot path, each fast path next to its slow reference."""
