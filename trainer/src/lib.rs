//! Recipes, training loops, optimizer and metrics: arrives with issue #4 (trainer).
