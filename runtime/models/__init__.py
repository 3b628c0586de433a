"""Wan2.1 networks written as functions of their weights (views into streamed buffers), not as owned Modules."""
