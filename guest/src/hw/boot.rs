//! Entry code, in assembly: the PVH ELF note, the 32-bit PVH entry (loads
//! the GDT and the static identity page tables for the first 64 GiB, 2 MiB
//! pages, the 3–4 GiB MMIO hole uncached; enters long mode, clears `.bss`,
//! masks the legacy PIC), the real-mode trampoline application processors
//! start in, the exception and interrupt stubs, and the stacks.
//!
//! The guest is compiled without SSE (see `.cargo/config.toml`): under PVM
//! the guest kernel's instructions go through KVM's instruction emulator,
//! which cannot execute most SSE instructions. CR4.OSFXSR is still set so
//! that nothing breaks if SSE code ever appears.
//!
//! Under PVM, every guest-kernel instruction costs about a microsecond (it
//! is emulated), so this code avoids work at boot: the page tables are
//! static data, `.bss` is small and cleared 8 bytes at a time, and the timer
//! interrupt handler is a handful of instructions.

use core::arch::global_asm;
use core::sync::atomic::AtomicU32;

/// Where the image is loaded (and the linker script links it): the
/// interrupt entry points sit at fixed offsets from it.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Bytes covered by the boot page tables (identity mapped).
pub const MAPPED_LIMIT: u64 = 64 << 30;
/// Most application processors started.
pub const MAX_APS: u32 = 16;
/// Where the AP trampoline is copied (SIPI vector 0x08).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// GDT selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Boot stage timestamps (microseconds since entry), for `info`: clock,
/// firmware tables, LAPIC timer, PCI scan, drivers, other CPUs, shell start.
pub static STAGES_US: [AtomicU32; 7] = [const { AtomicU32::new(0) }; 7];
/// Names of [`STAGES_US`].
pub const STAGE_NAMES: [&str; 7] = ["clock", "tables", "lapic", "pci", "drivers", "smp", "shell"];

/// Records the end of boot stage `i`.
pub fn stage(i: usize) {
    let us = u32::try_from(super::clock::since_entry_ns() / 1000).unwrap_or(u32::MAX);
    if let Some(s) = STAGES_US.get(i) {
        s.store(us, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Next AP stack slot; incremented by each AP as it enters long mode.
pub static AP_NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" {
    /// The GDT (6 entries; 4 and 5 are the TSS descriptor, filled at boot).
    pub static mut GDT64: [u64; 6];
    /// First byte of the 16-bit AP trampoline.
    pub static AP_TRAMPOLINE_START: u8;
    /// One past the last byte of the AP trampoline.
    pub static AP_TRAMPOLINE_END: u8;
    /// The interrupt descriptor table (static: see the assembly).
    pub static IDT: u8;
    /// One past the end of [`IDT`].
    pub static IDT_END: u8;
    /// Top of the exception stack (IST1).
    pub static IST1_TOP: u8;
    /// Top of the interrupt stack (IST2).
    pub static IST2_TOP: u8;
    /// End of the loaded image (page aligned).
    pub static __image_end: u8;
}

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32
    .p2align 2

    // Enables PAE, OSFXSR/OSXMMEXCPT, the boot page tables, EFER.LME and
    // paging, then far-jumps to 64-bit code at `target`. Uses no stack: an
    // AP arriving from the trampoline has none, and the PVH contract does
    // not promise the boot CPU one.
    .macro ENTER_LONG target
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, offset BOOT_PML4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xFFFFFFFB
    or eax, 0x80000023
    mov cr0, eax
    // jmp far 0x08:target
    .byte 0xea
    .long \target
    .word 0x08
    .endm

    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov esi, ebx
    lgdt [GDT64_PTR]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    // PVH leaves ESP undefined: have a valid stack from the first
    // instruction, so that nothing before long mode can push to address 0.
    mov esp, offset bsp_stack_top
    xor eax, eax
    mov fs, ax
    mov gs, ax
    ENTER_LONG start64

ap_start32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    ENTER_LONG ap_start64

    .code64
start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rsp, [rip + bsp_stack_top]
    fninit
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    mov edi, esi
    xor ebp, ebp
    call {rust_main}
.Lbsp_hang:
    cli
    hlt
    jmp .Lbsp_hang

ap_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, 1
    lock xadd dword ptr [rip + {ap_next}], eax
    cmp eax, {max_aps}
    jae .Lap_hang
    mov ecx, eax
    inc ecx
    shl rcx, 13
    lea rsp, [rip + ap_stacks]
    add rsp, rcx
    fninit
    mov edi, eax
    call {ap_main}
.Lap_hang:
    cli
    hlt
    jmp .Lap_hang

    // The interrupt entry points, at fixed addresses from the start of the
    // image (the linker script places this section first and checks it):
    // exception vector v at image_base + 16 * v, the spurious-interrupt
    // stub at image_base + 0x200, the timer at image_base + 0x210. Fixed
    // addresses let the IDT below be static data: the assembler cannot
    // split relocatable addresses into gate fields, and building the IDT at
    // run time costs ~500 emulated instructions under PVM.
    .section .text.idt_stubs, "ax", @progbits
    .global IDT_STUBS_BASE
IDT_STUBS_BASE:
    // Vectors that push no error code push a zero in its place.
    .macro EXC_STUB v, has_error
    .org 16 * \v
    .if \has_error == 0
    push 0
    .endif
    push \v
    jmp exc_common
    .endm
    EXC_STUB 0, 0
    EXC_STUB 1, 0
    EXC_STUB 2, 0
    EXC_STUB 3, 0
    EXC_STUB 4, 0
    EXC_STUB 5, 0
    EXC_STUB 6, 0
    EXC_STUB 7, 0
    EXC_STUB 8, 1
    EXC_STUB 9, 0
    EXC_STUB 10, 1
    EXC_STUB 11, 1
    EXC_STUB 12, 1
    EXC_STUB 13, 1
    EXC_STUB 14, 1
    EXC_STUB 15, 0
    EXC_STUB 16, 0
    EXC_STUB 17, 1
    EXC_STUB 18, 0
    EXC_STUB 19, 0
    EXC_STUB 20, 0
    EXC_STUB 21, 1
    EXC_STUB 22, 0
    EXC_STUB 23, 0
    EXC_STUB 24, 0
    EXC_STUB 25, 0
    EXC_STUB 26, 0
    EXC_STUB 27, 0
    EXC_STUB 28, 0
    EXC_STUB 29, 1
    EXC_STUB 30, 1
    EXC_STUB 31, 0

    .org 0x200
    .global spurious_stub
spurious_stub:
    iretq

    // LAPIC timer: kept to a few instructions because under PVM each one
    // is emulated. Counts ticks and, while the ticker runs, the largest TSC
    // delta between consecutive ticks.
    .org 0x210
    .global timer_stub
timer_stub:
    push rax
    push rcx
    push rdx
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp byte ptr [rip + {ticker_running}], 0
    je .Ltimer_eoi
    mov rcx, rax
    sub rcx, qword ptr [rip + {ticker_last}]
    mov qword ptr [rip + {ticker_last}], rax
    cmp rcx, qword ptr [rip + {ticker_max}]
    jbe .Ltimer_count
    mov qword ptr [rip + {ticker_max}], rcx
.Ltimer_count:
    inc qword ptr [rip + {ticker_count}]
.Ltimer_eoi:
    inc qword ptr [rip + {timer_ticks}]
    mov rax, qword ptr [rip + {lapic_eoi}]
    mov dword ptr [rax], 0
    pop rdx
    pop rcx
    pop rax
    iretq

    .section .text, "ax", @progbits
    .p2align 4
exc_common:
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    and rsp, -16
    cld
    call {exception_handler}
    ud2

    // The IDT: 64-bit interrupt gates (type 0x8e) on code selector 0x08.
    .macro GATE addr, ist
    .quad ((\addr) & 0xffff) | (0x08 << 16) | ((\ist) << 32) | (0x8e << 40) | ((((\addr) >> 16) & 0xffff) << 48)
    .quad (\addr) >> 32
    .endm
    .section .data.idt, "aw", @progbits
    .p2align 4
    .global IDT
IDT:
    .set v, 0
    .rept 32
    GATE {image_base} + 16 * v, 1
    .set v, v + 1
    .endr
    .skip ({timer_vector} - 32) * 16
    GATE {image_base} + 0x210, 2
    .skip ({spurious_vector} - {timer_vector} - 1) * 16
    GATE {image_base} + 0x200, 2
    .global IDT_END
IDT_END:

    .section .rodata.ap_trampoline, "a", @progbits
    .p2align 4
    .global AP_TRAMPOLINE_START
    .code16
AP_TRAMPOLINE_START:
    cli
    cld
    mov ax, cs
    mov ds, ax
    // o32 lgdt [ds:ap_gdt_ptr] (disp16 relative to the trampoline base).
    .byte 0x66, 0x0f, 0x01, 0x16
    .word ap_gdt_ptr - AP_TRAMPOLINE_START
    mov eax, cr0
    or al, 1
    mov cr0, eax
    .byte 0x66, 0xea
    .long ap_start32
    .word 0x18
    .p2align 3
ap_gdt_ptr:
    .word GDT64_END - GDT64 - 1
    .long GDT64
    .global AP_TRAMPOLINE_END
AP_TRAMPOLINE_END:
    .code64

    .section .data.gdt, "aw", @progbits
    .p2align 4
    .global GDT64
GDT64:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
    .quad 0
    .quad 0
GDT64_END:
    .p2align 3
GDT64_PTR:
    .word GDT64_END - GDT64 - 1
    .quad GDT64

    // Identity map of the first 64 GiB with 2 MiB pages, as static data
    // (building it at run time would cost ~0.5 s under an instruction
    // emulator). The 3-4 GiB MMIO hole is uncached (PCD | PWT).
    .section .data.pagetables, "aw", @progbits
    .p2align 12
    .global BOOT_PML4
BOOT_PML4:
    .quad BOOT_PDPT + 3
    .skip 4088
BOOT_PDPT:
    .set pd, 0
    .rept 64
    .quad BOOT_PD + pd * 4096 + 3
    .set pd, pd + 1
    .endr
    .skip 4096 - 64 * 8
BOOT_PD:
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x83
    .set page, page + 1
    .endr
    .rept 512
    .quad (page << 21) | 0x9b
    .set page, page + 1
    .endr
    .rept 32768 - 2048
    .quad (page << 21) | 0x83
    .set page, page + 1
    .endr

    .section .stacks, "aw", @nobits
    .p2align 12
    .skip 524288
bsp_stack_top:
    .skip 16384
    .global IST1_TOP
IST1_TOP:
    .skip 16384
    .global IST2_TOP
IST2_TOP:
ap_stacks:
    .skip 8192 * {max_aps}

    .text
"#,
    rust_main = sym crate::rust_main,
    ap_main = sym crate::hw::smp::ap_main,
    ap_next = sym AP_NEXT_INDEX,
    max_aps = const MAX_APS,
    exception_handler = sym crate::hw::intr::exception_handler,
    ticker_running = sym crate::hw::intr::TICKER_RUNNING,
    ticker_last = sym crate::hw::intr::TICKER_LAST_TSC,
    ticker_max = sym crate::hw::intr::TICKER_MAX_TSC,
    ticker_count = sym crate::hw::intr::TICKER_COUNT,
    timer_ticks = sym crate::hw::intr::TIMER_TICKS,
    lapic_eoi = sym crate::hw::intr::LAPIC_EOI_ADDR,
    image_base = const IMAGE_BASE,
    timer_vector = const crate::hw::intr::TIMER_VECTOR,
    spurious_vector = const crate::hw::intr::SPURIOUS_VECTOR,
);
