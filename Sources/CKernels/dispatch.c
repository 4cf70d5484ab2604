// Which tier's kernels run: one table per tier (designated initialisers, so a field cannot be
// filled with its neighbour's function), the CPU detection, the process-wide selection and the
// per-thread binding. Tiers that add nothing for an operation take the tier below's function.
#include "internal.h"

#include <stdlib.h>
#include <strings.h>

static const st_kernel_table portable = {
    .dot_q4_0 = st_dot_q4_0_portable,
    .dot_q8_0 = st_dot_q8_0_portable,
    .dot_q4_0_tokens = st_dot_q4_0_tokens_portable,
    .dot_q8_0_tokens = st_dot_q8_0_tokens_portable,
    .dot_f32 = st_dot_f32_portable,
    .dot_bf16 = st_dot_bf16_portable,
    .dot_f16 = st_dot_f16_portable,
    .axpy_q4_0 = st_axpy_q4_0_portable,
    .axpy_q8_0 = st_axpy_q8_0_portable,
    .axpy_f32 = st_axpy_f32_portable,
    .axpy_bf16 = st_axpy_bf16_portable,
    .axpy_f16 = st_axpy_f16_portable,
    .quantize_q8_0 = st_quantize_q8_0_portable,
    .dot_q4_0_x8 = st_dot_q4_0_x8_portable,
    .dot_q4_0_b8 = st_dot_q4_0_b8_portable,
    .dot_q4_0_b8_ahead = st_dot_q4_0_b8_ahead_portable,
    .axpy_rows_q4_0 = st_axpy_rows_q4_0_portable,
    .attend = st_attend_portable,
    .axpy_rows2_q4_0 = st_axpy_rows2_q4_0_portable,
};

#ifdef ST_X86
static const st_kernel_table avx2 = {
    .dot_q4_0 = st_dot_q4_0_avx2,
    .dot_q8_0 = st_dot_q8_0_avx2,
    .dot_q4_0_tokens = st_dot_q4_0_tokens_avx2,
    .dot_q8_0_tokens = st_dot_q8_0_tokens_avx2,
    .dot_f32 = st_dot_f32_avx2,
    .dot_bf16 = st_dot_bf16_avx2,
    .dot_f16 = st_dot_f16_avx2,
    .axpy_q4_0 = st_axpy_q4_0_avx2,
    .axpy_q8_0 = st_axpy_q8_0_avx2,
    .axpy_f32 = st_axpy_f32_avx2,
    .axpy_bf16 = st_axpy_bf16_avx2,
    .axpy_f16 = st_axpy_f16_avx2,
    .quantize_q8_0 = st_quantize_q8_0_avx2,
    .dot_q4_0_x8 = st_dot_q4_0_x8_avx2,
    .dot_q4_0_b8 = st_dot_q4_0_b8_avx2,
    .dot_q4_0_b8_ahead = st_dot_q4_0_b8_ahead_avx2,
    .axpy_rows_q4_0 = st_axpy_rows_q4_0_avx2,
    .attend = st_attend_avx2,
    .axpy_rows2_q4_0 = st_axpy_rows2_q4_0_avx2,
};

// AVX-512 VNNI: the byte dot products, the Q4_0 axpys, attention and quantisation at 512 bits
// or with VNNI; the float dot products and axpys of AVX2 (memory-bound: wider adds nothing).
static const st_kernel_table avx512 = {
    .dot_q4_0 = st_dot_q4_0_avx512,
    .dot_q8_0 = st_dot_q8_0_avx512,
    .dot_q4_0_tokens = st_dot_q4_0_tokens_avx512,
    .dot_q8_0_tokens = st_dot_q8_0_tokens_avx512,
    .dot_f32 = st_dot_f32_avx2,
    .dot_bf16 = st_dot_bf16_avx2,
    .dot_f16 = st_dot_f16_avx2,
    .axpy_q4_0 = st_axpy_q4_0_avx512,
    .axpy_q8_0 = st_axpy_q8_0_avx2,
    .axpy_f32 = st_axpy_f32_avx2,
    .axpy_bf16 = st_axpy_bf16_avx2,
    .axpy_f16 = st_axpy_f16_avx2,
    .quantize_q8_0 = st_quantize_q8_0_avx512,
    .dot_q4_0_x8 = st_dot_q4_0_x8_avx512,
    .dot_q4_0_b8 = st_dot_q4_0_b8_avx512,
    .dot_q4_0_b8_ahead = st_dot_q4_0_b8_ahead_avx512,
    .axpy_rows_q4_0 = st_axpy_rows_q4_0_avx512,
    .attend = st_attend_avx512,
    .axpy_rows2_q4_0 = st_axpy_rows2_q4_0_avx512,
};
#endif
#ifdef ST_ARM
// NEON: every operation four lanes wide; the byte dot products through st_sdot_neon (SDOT's
// arithmetic from widening multiplies). NEON with SDOT: the byte dot products with vdotq_s32,
// the rest as NEON.
static const st_kernel_table neon = {
    .dot_q4_0 = st_dot_q4_0_neon,
    .dot_q8_0 = st_dot_q8_0_neon,
    .dot_q4_0_tokens = st_dot_q4_0_tokens_neon,
    .dot_q8_0_tokens = st_dot_q8_0_tokens_neon,
    .dot_f32 = st_dot_f32_neon,
    .dot_bf16 = st_dot_bf16_neon,
    .dot_f16 = st_dot_f16_neon,
    .axpy_q4_0 = st_axpy_q4_0_neon,
    .axpy_q8_0 = st_axpy_q8_0_neon,
    .axpy_f32 = st_axpy_f32_neon,
    .axpy_bf16 = st_axpy_bf16_neon,
    .axpy_f16 = st_axpy_f16_neon,
    .quantize_q8_0 = st_quantize_q8_0_neon,
    .dot_q4_0_x8 = st_dot_q4_0_x8_neon,
    .dot_q4_0_b8 = st_dot_q4_0_b8_neon,
    .dot_q4_0_b8_ahead = st_dot_q4_0_b8_ahead_neon,
    .axpy_rows_q4_0 = st_axpy_rows_q4_0_neon,
    .attend = st_attend_neon,
    .axpy_rows2_q4_0 = st_axpy_rows2_q4_0_neon,
};

static const st_kernel_table dotprod = {
    .dot_q4_0 = st_dot_q4_0_dotprod,
    .dot_q8_0 = st_dot_q8_0_dotprod,
    .dot_q4_0_tokens = st_dot_q4_0_tokens_dotprod,
    .dot_q8_0_tokens = st_dot_q8_0_tokens_dotprod,
    .dot_f32 = st_dot_f32_neon,
    .dot_bf16 = st_dot_bf16_neon,
    .dot_f16 = st_dot_f16_neon,
    .axpy_q4_0 = st_axpy_q4_0_neon,
    .axpy_q8_0 = st_axpy_q8_0_neon,
    .axpy_f32 = st_axpy_f32_neon,
    .axpy_bf16 = st_axpy_bf16_neon,
    .axpy_f16 = st_axpy_f16_neon,
    .quantize_q8_0 = st_quantize_q8_0_neon,
    .dot_q4_0_x8 = st_dot_q4_0_x8_dotprod,
    .dot_q4_0_b8 = st_dot_q4_0_b8_dotprod,
    .dot_q4_0_b8_ahead = st_dot_q4_0_b8_ahead_dotprod,
    .axpy_rows_q4_0 = st_axpy_rows_q4_0_neon,
    .attend = st_attend_neon,
    .axpy_rows2_q4_0 = st_axpy_rows2_q4_0_neon,
};

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
static int st_has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int st_has_dotprod(void) {
    int value = 0;
    size_t size = sizeof value;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, 0, 0) == 0 && value != 0;
}
#else
static int st_has_dotprod(void) { return 0; }
#endif
#endif

static const st_kernel_table *active = &portable;
static int active_isa = -1;
// A thread's own choice (st_kernels_bind), which wins over the process-wide one: sessions that
// run different tiers side by side (the tests run every model check under every tier) each bind
// theirs on the threads that compute for them.
static _Thread_local const st_kernel_table *bound = 0;
static _Thread_local int bound_isa = -1;

int st_detect_isa(void) {
#ifdef ST_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return ST_ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        return ST_ISA_AVX2;
    }
#endif
#ifdef ST_ARM
    return st_has_dotprod() ? ST_ISA_DOTPROD : ST_ISA_NEON;
#endif
    return ST_ISA_PORTABLE;
}

const st_kernel_table *st_kernels_for(int isa) {
    if (isa == ST_ISA_PORTABLE) return &portable;
#ifdef ST_X86
    const int best = st_detect_isa();
    if (isa == ST_ISA_AVX512 && best >= ST_ISA_AVX512) return &avx512;
    if (isa == ST_ISA_AVX2 && best >= ST_ISA_AVX2) return &avx2;
#endif
#ifdef ST_ARM
    if (isa == ST_ISA_NEON) return &neon;
    if (isa == ST_ISA_DOTPROD && st_has_dotprod()) return &dotprod;
#endif
    return 0;
}

int st_kernels_select(int isa) {
    if (!st_kernels_for(isa)) isa = st_detect_isa();
    active = st_kernels_for(isa);
    active_isa = isa;
    return isa;
}

// Before anyone selects: STRUN_KERNELS where it names a tier this CPU has (the Swift side
// reports a bad value as an error), else the best detected.
static void select_default(void) {
    const char *name = getenv("STRUN_KERNELS");
    int isa = st_detect_isa();
    if (name && strcasecmp(name, "portable") == 0) isa = ST_ISA_PORTABLE;
    if (name && strcasecmp(name, "avx2") == 0 && st_kernels_for(ST_ISA_AVX2)) isa = ST_ISA_AVX2;
    if (name && strcasecmp(name, "neon") == 0 && st_kernels_for(ST_ISA_NEON)) isa = ST_ISA_NEON;
    st_kernels_select(isa);
}

int st_kernels_isa(void) {
    if (bound) return bound_isa;
    if (active_isa < 0) select_default();
    return active_isa;
}

int st_kernels_bind(int isa) {
    const int previous = bound ? bound_isa : -1;
    const st_kernel_table *k = isa < 0 ? 0 : st_kernels_for(isa);
    if (isa >= 0 && !k) return -2;
    bound = k;
    bound_isa = k ? isa : -1;
    return previous;
}

int st_kernels_bound(void) { return bound ? bound_isa : -1; }

const st_kernel_table *st_table(void) {
    if (bound) return bound;
    if (active_isa < 0) select_default();
    return active;
}
