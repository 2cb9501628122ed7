"""The InstructionGPT-4 data selector: quality scores, spectral clusters, a budget spread over clusters."""
