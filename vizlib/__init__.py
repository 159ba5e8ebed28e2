"""HybridLens computation and drawing library: no Streamlit here, everything unit-testable."""
