"""The plan in words and pictures: your config as written, the plan, the -v tables (render), the
plan's tokens/s words and how it compares with the config as written (rates), and --plot's chart
(plot). May import planning/ and the parts below it; never launch/ or cli/."""
