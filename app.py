"""HybridLens: ``streamlit run app.py``. Navigation, the shared sidebar image picker, then the page."""

from __future__ import annotations

import streamlit as st

from ui import navigation, sidebar

st.set_page_config(page_title="HybridLens", page_icon=":material/center_focus_strong:", layout="wide")
page = st.navigation(navigation.st_pages())
sidebar.image_picker()  # before the page runs, so every page sees the same, current image
page.run()
