"""The plan in words and pictures: your config as written, the plan, the -v tables (render) and
--plot's chart (plot). May import planning/ and the bottom modules; never launch/ or cli/."""
