"""`upgrade`: releases side by side, built, gated, switched, watched and switched back."""
