//! One loop body compiled three times, for AVX-512, AVX2 and the baseline target, picked at
//! run time: the default x86-64 target is SSE2 only, so without this the loops would run
//! 4 lanes wide on CPUs that have 8 or 16. The cached feature check costs a few
//! nanoseconds per call; each call does a chunk of rows.

/// Defines `fn $name(args)` that runs `$body` compiled for the best instruction set the CPU
/// has. The body must be safe code; only the feature-gated wrappers are `unsafe`, and they are
/// called only after their features are detected.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) {
                    body($($arg),*)
                }
                let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
                if avx2 && std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA, detected above.
                    return unsafe { v4($($arg),*) };
                }
                if avx2 {
                    // SAFETY: the CPU has AVX2 and FMA, detected above.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
