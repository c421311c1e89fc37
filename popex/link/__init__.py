"""The link between tiers: emulation in-process, tc shaping, link profiles, link control."""
