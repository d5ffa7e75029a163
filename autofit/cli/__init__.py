"""The commands: `autofit config | probe | run` (app), `data` and `sample` (data), `profiles`
(profiles), what they share (common: consoles, one-line user errors, options), and how a run's
end is said (run_end). The top part:
may import every other part of autofit and trainer; nothing imports it but autofit.__main__."""
