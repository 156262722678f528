"""Upload: a new image and caption, attributed on the spot with the run's exact TRAK pipeline."""

import hashlib

import streamlit as st

from dashboard import state, ui
from engine.data.images import MAX_UPLOAD_MB, open_query_image
from engine.errors import InputError

RESULT_KEY = "upload-result"  # (digest, PIL image, QueryResult) of the last query
KEEP_SIDE = 1024  # largest side of the uploaded image a session keeps (display, exports)
TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif"]

run = state.open_run()
st.title("Upload an image and a caption")
st.caption(
    "trakview computes the pair's gradient with every checkpoint and scores all training pairs, "
    "as it did for the validation pairs. The image is kept in memory only."
)
with st.form("upload"):
    left, right = st.columns([1, 2])
    file = left.file_uploader("Image", type=TYPES, max_upload_size=MAX_UPLOAD_MB)
    caption = right.text_input("Caption", placeholder="e.g. a small red circle on the left")
    submitted = right.form_submit_button(
        "Find influencers", type="primary", icon=":material/search:"
    )

if submitted:
    raw = file.getvalue() if file is not None else b""
    problem = None
    if file is None:
        problem = "Choose an image file first."
    elif len(raw) > MAX_UPLOAD_MB * 2**20:
        problem = f"{file.name} is {len(raw) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB."
    elif not caption.strip():
        problem = "Type the caption the image should match."
    if problem is None:
        try:
            image = open_query_image(raw)
            with st.spinner("Computing TRAK scores for this pair…"):
                result = run.query(image, caption, k=50)
            # kept per session: the result and an image of display size, not the upload
            image.thumbnail((KEEP_SIDE, KEEP_SIDE))
            st.session_state[RESULT_KEY] = (hashlib.sha256(raw).hexdigest(), image, result)
        except InputError as err:
            problem = str(err)
    if problem:
        st.error(ui.plain(problem))
        st.session_state.pop(RESULT_KEY, None)

if RESULT_KEY in st.session_state:
    digest, image, result = st.session_state[RESULT_KEY]
    for note in result.notes:
        st.info(ui.plain(note))
    ui.pair_header(
        image,  # decoded: the browser may not show the file itself (16-bit, CMYK)
        result.caption,
        {
            "CLIP similarity": (ui.fmt(result.clip_similarity), "Cosine of image and caption."),
            "CLIP margin": (ui.fmt(result.margin), "The model output TRAK attributes."),
            "Computed in": (
                f"{sum(result.timings.values()):.2f} s",
                ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()),
            ),
        },
    )
    k = ui.k_input("up-k")
    ui.influence_view(run, result, k, f"up-{digest[:8]}", query_image=image, plots_key="up-plots")
