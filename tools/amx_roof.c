/* The AMX roof: what this core's tdpbf16ps reaches in the loop our AMX register tile runs
 * (codegen_bf16.amx_tile: 2x2 C tiles of 16x16 float32, two A and two B tiles per 32 k, each
 * load just before its first product), with the panels in L1 so memory is out of the picture.
 * BENCHMARKS.md quotes our bf16 GFLOPS as a fraction of this.
 *
 *     cc -O2 -march=native tools/amx_roof.c -o /tmp/amx_roof && /tmp/amx_roof [KC=256] [PANELS=1]
 *
 * KC: k of one panel (A and B panels of 32 x KC bf16 each); PANELS: A panels streamed past one
 * B panel (1: all in L1).  Zero-filled data: the tile unit's speed does not depend on values.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void configure_tiles(void)
{
    struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; }
        __attribute__((aligned(64))) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* 32x32 of C over kc: A panel [k/32][32 rows][32], B panel [k/2][32 columns][2] */
__attribute__((noinline)) static void tile(int64_t kc, const uint16_t *a, const uint16_t *b, float *c)
{
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kk = 0; kk < kc; kk += 32) {
        _tile_loadd(4, a, 64);
        _tile_loadd(6, b, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b + 32, 128);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a + 512, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        a += 1024; b += 1024;
    }
    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128); _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
}

int main(int argc, char **argv)
{
    const int64_t kc = argc > 1 ? atoll(argv[1]) : 256, panels = argc > 2 ? atoll(argv[2]) : 1;
    if (kc < 32 || kc % 32 || panels < 1) { fprintf(stderr, "KC: a multiple of 32; PANELS >= 1\n"); return 2; }
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
        fprintf(stderr, "Linux refused the AMX tile state\n");
        return 1;
    }
    configure_tiles();
    uint16_t *a = aligned_alloc(64, (size_t)(panels * 32 * kc * 2)), *b = aligned_alloc(64, (size_t)(32 * kc * 2));
    float *c = aligned_alloc(64, (size_t)(panels * 1024 * 4));
    if (!a || !b || !c) return 1;
    memset(a, 0, (size_t)(panels * 32 * kc * 2));
    memset(b, 0, (size_t)(32 * kc * 2));
    const double flops_per_pass = 2.0 * 32 * 32 * kc * panels;
    double best = 0;
    for (int run = 0; run < 5; run++) {      /* the best of five runs of about 0.2 s */
        const long passes = (long)(4e11 / flops_per_pass) + 1;
        const double t0 = seconds();
        for (long it = 0; it < passes; it++)
            for (int64_t p = 0; p < panels; p++) tile(kc, a + p * 32 * kc, b, c + p * 1024);
        const double gflops = passes * flops_per_pass / (seconds() - t0) / 1e9;
        if (gflops > best) best = gflops;
    }
    _tile_release();
    printf("AMX 2x2-tile loop, kc=%lld, %lld A panel(s): %.0f GFLOPS (best of 5)\n", (long long)kc, (long long)panels, best);
    return 0;
}
