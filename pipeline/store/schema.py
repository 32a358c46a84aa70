"""The store's schema as numbered migrations, one list per dialect with the same numbers and meaning.

Migration N brings the schema from version N-1 to N. Append only; never edit a released one. SQLite keeps
the version in `PRAGMA user_version`, PostgreSQL in the one-row table `poolwatch_schema`.

The dialects differ where the engines do: SQLite's INTEGER is 64-bit and REAL a double, PostgreSQL spells
them BIGINT and DOUBLE PRECISION; paths are TEXT in SQLite (a BLOB for a name that is not UTF-8) and BYTEA
in PostgreSQL (its TEXT cannot hold such names); a SQLite store serves one node, so its (root, relpath)
stays unique, while PostgreSQL's identity is (node, root, relpath) from migration 5 on.
"""

from __future__ import annotations

SQLITE: tuple[str, ...] = (
    # 1: the base schema
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        root TEXT NOT NULL,
        relpath TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'corrupt', 'duplicate', 'missing')),
        reason TEXT,
        detail TEXT,
        duplicate_of INTEGER REFERENCES images(id),
        width INTEGER,
        height INTEGER,
        format TEXT,
        first_seen REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (root, relpath)
    );
    CREATE INDEX images_hash ON images(hash);
    CREATE INDEX images_status ON images(status);
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        weights_hash TEXT NOT NULL,
        input_size INTEGER NOT NULL,
        source TEXT NOT NULL,
        detail TEXT,
        arch TEXT NOT NULL,
        dim INTEGER NOT NULL,
        path TEXT,
        created REAL NOT NULL,
        is_current INTEGER NOT NULL DEFAULT 0,
        UNIQUE (weights_hash, input_size)
    );
    CREATE TABLE embeddings (
        image_id INTEGER NOT NULL REFERENCES images(id),
        model_id INTEGER NOT NULL REFERENCES models(id),
        vector BLOB NOT NULL,
        vhash TEXT NOT NULL,
        PRIMARY KEY (image_id, model_id)
    );
    CREATE INDEX embeddings_vhash ON embeddings(model_id, vhash);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        trigger TEXT NOT NULL,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL,
        error TEXT,
        config TEXT NOT NULL,
        method TEXT,
        pool TEXT,
        model_id INTEGER REFERENCES models(id),
        n_candidates INTEGER,
        n_selected INTEGER,
        stop_reason TEXT,
        output_dir TEXT,
        stats TEXT
    );
    CREATE TABLE decisions (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        image_id INTEGER NOT NULL REFERENCES images(id),
        selected INTEGER NOT NULL,
        rank INTEGER,
        distance REAL,
        PRIMARY KEY (run_id, image_id)
    );
    CREATE INDEX decisions_image ON decisions(image_id);
    CREATE TABLE datapool (
        pool TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id),
        added_in_run INTEGER REFERENCES runs(id),
        PRIMARY KEY (pool, image_id)
    );
    """,
    # 2: how many times the model failed on an image (it stays `pending` until the limit, then `corrupt`)
    """
    ALTER TABLE images ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: choices made once per store (the embedding mode `auto` picked, the decode mode), as JSON values
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 4: quality signals measured on the decoded image (pipeline/quality.py), and the near-duplicate link: the
    # earliest-seen image of the group, the distance to the neighbour found, and the model it was found under
    """
    ALTER TABLE images ADD COLUMN sharpness REAL;
    ALTER TABLE images ADD COLUMN brightness REAL;
    ALTER TABLE images ADD COLUMN contrast REAL;
    ALTER TABLE images ADD COLUMN entropy REAL;
    ALTER TABLE images ADD COLUMN colorfulness REAL;
    ALTER TABLE images ADD COLUMN aspect REAL;
    ALTER TABLE images ADD COLUMN near_duplicate_of INTEGER REFERENCES images(id);
    ALTER TABLE images ADD COLUMN near_distance REAL;
    ALTER TABLE images ADD COLUMN near_model_id INTEGER REFERENCES models(id);
    CREATE INDEX images_near ON images(near_duplicate_of) WHERE near_duplicate_of IS NOT NULL;
    """,
    # 5: many nodes. The node that holds an image (its rows are adopted by the store's one node in SQLite);
    # a per-model commit sequence of the vectors (a node's near-duplicate index catches up on the others'
    # commits by it); the node that ran a run, whether it asked for a dump, and which nodes dumped its selected images
    """
    ALTER TABLE images ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE embeddings ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX embeddings_seq ON embeddings(model_id, seq);
    ALTER TABLE runs ADD COLUMN node TEXT;
    ALTER TABLE runs ADD COLUMN dump INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE run_dumps (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        node TEXT NOT NULL,
        status TEXT NOT NULL,
        finished REAL,
        n_files INTEGER,
        output_dir TEXT,
        error TEXT,
        PRIMARY KEY (run_id, node)
    );
    """,
    # 6: files every node must share (a model's exported artifact, trained weights), kept in the store itself
    """
    CREATE TABLE blobs (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL
    );
    """,
    # 7: the duplicate checks look an image up by (hash, status): with `hash` alone indexed, SQLite's planner
    # walked every `ok` image instead (0.2-0.4 ms a check at 1,000 images, growing with the store)
    """
    CREATE INDEX images_hash_status ON images(hash, status);
    DROP INDEX images_hash;
    """,
)

POSTGRESQL: tuple[str, ...] = (
    # 1
    """
    CREATE TABLE images (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        root BYTEA NOT NULL,
        relpath BYTEA NOT NULL,
        size BIGINT NOT NULL,
        mtime_ns BIGINT NOT NULL,
        hash TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'corrupt', 'duplicate', 'missing')),
        reason TEXT,
        detail TEXT,
        duplicate_of BIGINT REFERENCES images(id),
        width INTEGER,
        height INTEGER,
        format TEXT,
        first_seen DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        CONSTRAINT images_root_relpath UNIQUE (root, relpath)
    );
    CREATE INDEX images_hash ON images(hash);
    CREATE INDEX images_status ON images(status);
    CREATE TABLE models (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        weights_hash TEXT NOT NULL,
        input_size INTEGER NOT NULL,
        source TEXT NOT NULL,
        detail TEXT,
        arch TEXT NOT NULL,
        dim INTEGER NOT NULL,
        path TEXT,
        created DOUBLE PRECISION NOT NULL,
        is_current INTEGER NOT NULL DEFAULT 0,
        UNIQUE (weights_hash, input_size)
    );
    CREATE TABLE embeddings (
        image_id BIGINT NOT NULL REFERENCES images(id),
        model_id BIGINT NOT NULL REFERENCES models(id),
        vector BYTEA NOT NULL,
        vhash TEXT NOT NULL,
        PRIMARY KEY (image_id, model_id)
    );
    CREATE INDEX embeddings_vhash ON embeddings(model_id, vhash);
    CREATE TABLE runs (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        trigger TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        finished DOUBLE PRECISION,
        status TEXT NOT NULL,
        error TEXT,
        config TEXT NOT NULL,
        method TEXT,
        pool TEXT,
        model_id BIGINT REFERENCES models(id),
        n_candidates BIGINT,
        n_selected BIGINT,
        stop_reason TEXT,
        output_dir TEXT,
        stats TEXT
    );
    CREATE TABLE decisions (
        run_id BIGINT NOT NULL REFERENCES runs(id),
        image_id BIGINT NOT NULL REFERENCES images(id),
        selected INTEGER NOT NULL,
        rank BIGINT,
        distance DOUBLE PRECISION,
        PRIMARY KEY (run_id, image_id)
    );
    CREATE INDEX decisions_image ON decisions(image_id);
    CREATE TABLE datapool (
        pool TEXT NOT NULL,
        image_id BIGINT NOT NULL REFERENCES images(id),
        added_in_run BIGINT REFERENCES runs(id),
        PRIMARY KEY (pool, image_id)
    );
    """,
    # 2
    """
    ALTER TABLE images ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # 3
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 4
    """
    ALTER TABLE images ADD COLUMN sharpness DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN brightness DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN contrast DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN entropy DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN colorfulness DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN aspect DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN near_duplicate_of BIGINT REFERENCES images(id);
    ALTER TABLE images ADD COLUMN near_distance DOUBLE PRECISION;
    ALTER TABLE images ADD COLUMN near_model_id BIGINT REFERENCES models(id);
    CREATE INDEX images_near ON images(near_duplicate_of) WHERE near_duplicate_of IS NOT NULL;
    """,
    # 5
    """
    ALTER TABLE images ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE images DROP CONSTRAINT images_root_relpath;
    ALTER TABLE images ADD CONSTRAINT images_identity UNIQUE (node, root, relpath);
    ALTER TABLE embeddings ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX embeddings_seq ON embeddings(model_id, seq);
    ALTER TABLE runs ADD COLUMN node TEXT;
    ALTER TABLE runs ADD COLUMN dump INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE run_dumps (
        run_id BIGINT NOT NULL REFERENCES runs(id),
        node TEXT NOT NULL,
        status TEXT NOT NULL,
        finished DOUBLE PRECISION,
        n_files BIGINT,
        output_dir TEXT,
        error TEXT,
        PRIMARY KEY (run_id, node)
    );
    """,
    # 6
    """
    CREATE TABLE blobs (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        data BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    """,
    # 7
    """
    CREATE INDEX images_hash_status ON images(hash, status);
    DROP INDEX images_hash;
    """,
)

TABLES = ("models", "images", "embeddings", "runs", "decisions", "datapool", "settings", "run_dumps", "blobs")  # FK order
