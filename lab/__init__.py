"""The lab: experiments and measurements beside the core (paper baselines, §7 analysis, PEFT interop, E2E evaluation)."""
