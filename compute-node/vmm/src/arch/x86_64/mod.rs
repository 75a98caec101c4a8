//! x86_64 specifics: the memory layout, boot registers, CPUID and MSR
//! filtering, the MP table and ACPI tables, and kernel loading.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod msr;
pub mod regs;
