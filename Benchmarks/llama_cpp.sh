# Sourced by the benchmark scripts that run llama.cpp: one place for its pinned version, how its
# source is fetched (the llama-cpp-python sdist through pip, only that package from source:
# `--no-binary :all:` would also build pip's build dependencies, cmake included) and how it is
# built. Not run on its own.
#
#   llama_cpp_fetch DIR                       source tree in DIR (kept if already there)
#   llama_cpp_build DIR native|avx2 TARGETS   prints the build folder (DIR/build-NAME)
#   llama_cpp_flags native|avx2               the cmake flags of that build
#   llama_cpp_converter DIR VENV              prints a python that runs DIR/convert_hf_to_gguf.py
LLAMA_CPP_PYTHON_VERSION=0.3.36   # pinned: the llama.cpp it vendors is the comparison

llama_cpp_fetch() {
    local dir=$1
    [ -f "$dir/CMakeLists.txt" ] && return 0
    local sdist
    sdist=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdist"
    tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$sdist"
    mkdir -p "$(dirname "$dir")"
    mv "$sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$dir"
    echo "$LLAMA_CPP_PYTHON_VERSION" > "$dir/LLAMA_CPP_PYTHON_VERSION"
    rm -rf "$sdist"
}

llama_cpp_flags() {
    case "$1" in
        native) echo "-DGGML_NATIVE=ON" ;;
        avx2) echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF" ;;
        *) echo "llama.cpp build must be native or avx2 (got '$1')" >&2; return 2 ;;
    esac
}

llama_cpp_build() {
    local dir=$1 name=$2; shift 2
    local build="$dir/build-$name" flags missing=""
    flags=$(llama_cpp_flags "$name")
    for t in "$@"; do
        [ -x "$build/bin/$t" ] || [ -n "$(find "$build" -name "lib$t.so" 2>/dev/null | head -1)" ] || missing="$missing $t"
    done
    if [ -n "$missing" ]; then
        command -v cmake >/dev/null || python3 -m pip install -q cmake >/dev/null 2>&1 || true
        # The server's target exists only when it is asked for (llama-server, for serve_llama.sh).
        local server=OFF
        case " $* " in *" llama-server "*) server=ON ;; esac
        # shellcheck disable=SC2086
        cmake -S "$dir" -B "$build" $flags -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=$server -DCMAKE_BUILD_TYPE=Release >/dev/null 2>"$dir/build-$name.log"
        # shellcheck disable=SC2086
        cmake --build "$build" --target $missing -j"$(nproc)" >/dev/null 2>>"$dir/build-$name.log" \
            || { echo "llama.cpp build failed: $dir/build-$name.log" >&2; return 1; }
    fi
    echo "$build"
}

# The converter needs torch and transformers at the versions its requirements files pin. python3
# is used when it has them; otherwise they go into the virtual environment VENV (made if absent),
# installed by name: the files also name PyTorch's own package index, which is not used here, so
# torch comes from PyPI (its Linux wheel brings the CUDA libraries, about 5 GB installed; it runs
# on the CPU all the same).
llama_cpp_converter() {
    local dir=$1 venv=$2 probe="import torch, transformers, sentencepiece, safetensors"
    if python3 -c "$probe" 2>/dev/null; then command -v python3; return 0; fi
    if ! "$venv/bin/python" -c "$probe" 2>/dev/null; then
        local reqs
        reqs=$(cat "$dir"/requirements/requirements-convert_hf_to_gguf.txt \
            "$dir"/requirements/requirements-convert_legacy_llama.txt | grep -v -E '^[[:space:]]*(-|#|$)' | grep -v '^gguf')
        python3 -m venv "$venv"
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install -q $reqs safetensors >"$venv.log" 2>&1 \
            || { echo "installing llama.cpp's converter requirements failed: $venv.log" >&2; return 1; }
    fi
    echo "$venv/bin/python"
}
