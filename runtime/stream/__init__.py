"""The disk -> pinned host -> GPU streaming engine and the planner that sizes it."""
