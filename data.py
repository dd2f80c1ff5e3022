"""data.py: the synthetic conversation world, the tiny face model, audio features, and the dataset readers.

API CONTRACT (stub: the implementation is being written; every method file codes against these names).

Constants
    FPS = 30, SR = 16000, EXP_DIM = 50, POSE_DIM = 6, MOTION_DIM = 56, BETA_DIM = 100, ATTR_DIM = 25
    EMOTIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
    EXP = slice(0, 50), POSE = slice(50, 56), HEAD = slice(50, 53), JAW = slice(53, 56)
    SEGMENT_FRAMES = 240, K_ALT = 10
    DATA_ROOT = <repo>/data

World generation (cached; prints what it made and how long it took)
    generate_world(root=None, preset="default"|"tiny", seed=0, force=False) -> Path
        root defaults to DATA_ROOT/"world" (default) or DATA_ROOT/"tiny" (tiny). Writes
        root/listener/ (segments format: segments_{train,val,test}.pth, mean.npy, std.npy, wav/<fname>.wav)
        root/vocaset/  (VOCASET layout: wav/, vertices_npy/, templates.pkl, regions.npz)
    resolve_data(path: str | None, kind: "listener"|"talking", preset="default") -> Path
        "" / None -> generate_world(preset=...) and return its listener/ or vocaset/ folder; a world root
        (with listener/ and vocaset/) -> the sub-folder of that kind; anything else -> path itself.
        preset "smoke" maps to the tiny world.

Listener data (every reader returns the same items)
    load_listener(path, split) -> list[dict]      split in {"train", "val", "test"}
        detects the format: segments (segments_{split}.pth), l2l (<path>/<split>/p0_list_faces_clean_deca.npy),
        react (<path>/<split>/Emotion/...). Item keys:
          name          str, unique ("<fname>:<start>-<end>")
          fps           int
          start_frame   int (true start in the source video)
          listener      (T, D) float32 raw motion, D = 56 = exp 50 | head rot 3 | jaw 3 (58 on REACT 3DMM)
          speaker       (T, D) float32 raw motion
          listener_beta (100,) float32 identity shape (zeros when the dataset has none)
          speaker_beta  (100,) float32
          listener_id   int (-1 when unknown)
          listener_attr (T, 25) float32 REACT attributes [15 AUs | valence, arousal | 8 emotion probs]
          speaker_attr  (T, 25) float32
          audio         (S,) float32 speaker waveform at SR for exactly these frames, or None
          audio_rows    (4T, F) float32 precomputed audio rows (L2L files), or None
          words         list[(text, end_seconds)] relative to the segment start; negative = history (3 s)
          alt_listener  (K, T, D) float32 alternative appropriate reactions (val/test), or None
    load_stats(path) -> (mean (D,), std (D,)) float32: train-split statistics stored with the data.
    VOCAB: list[str] of the world's words (index 0 is not reserved here; method files add their own pads).

Talking-face data (VOCASET layout)
    load_talking(path, split) -> list[dict] with keys
          name, subject (str), style (int in [0, n_train_subjects) for training subjects, -1 otherwise),
          audio (S,) float32 at SR, vertices (T, V, 3) float32 at FPS, template (V, 3) float32, fps
    talking_regions(path) -> (lip_idx, upper_idx) int64 arrays
    TRAIN_SUBJECTS, VAL_SUBJECTS, TEST_SUBJECTS: lists of subject names (8, 2, 2)

Audio
    load_wav(path, sr=SR) -> (S,) float32 mono at sr (any input rate, stereo mixed down; clear errors)
    mfcc(wave, sr=SR, rate=120.0, n_mfcc=40, n_rows=None) -> (n_rows, n_mfcc) float32
        torch.stft -> mel -> log -> DCT, `rate` rows per second (120 = 4 rows per 30-fps frame, 50 = wav2vec2 grid);
        n_rows forces the exact number of rows (default round(duration * rate)).

Face model
    FaceModel(seed=0): n_vertices, edges (E, 2), lip_idx, upper_face_idx,
        template(beta) -> (V, 3); vertices(motion (T, 56), beta) -> (T, V, 3)
        valence(motion (..., 56)) -> (...), arousal(...), aus(...) -> (..., 15), emotion_probs(...) -> (..., 8),
        attributes(motion) -> (..., 25)

Pictures
    render_gif(path, motions: list[(T, 56)], betas: list[(100,)], titles: list[str], fps=FPS) -> Path
    render_vertices_gif(path, vertices: list[(T, V, 3)], titles, fps=FPS) -> Path
    plot_channels(path, series: dict[str, (T, D)], channels=None, fps=FPS) -> Path (PNG)
"""
