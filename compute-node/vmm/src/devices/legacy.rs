//! Small fixed I/O-port devices: the ACPI sleep control/status registers
//! (poweroff), the i8042 reset line and port 0xcf9 (reboot), and the power
//! button a graceful shutdown request presses: it sets the status register
//! below (which the test guest polls) and raises the ACPI Generic Event
//! Device's interrupt, GSI [`GED_IRQ`] (which Linux handles, see
//! `arch::x86_64::acpi`).
//!
//! | port | access | meaning |
//! |---|---|---|
//! | 0x600 | write `0x34` (SLP_TYP=5, SLP_EN) | power off |
//! | 0x601 | read | sleep status, always 0 |
//! | 0x602 | read | bit 0 set: the host asks the guest to shut down |
//! | 0x602 | write bit 0 | acknowledge (clears it) |
//! | 0x64 | write `0xfe` | reset (reboot) |
//! | 0xcf9 | write with bit 2 set | reset (reboot) |

use std::sync::atomic::{AtomicBool, Ordering};

use super::interrupt::IrqLine;

/// ACPI hardware-reduced sleep control register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Power button status (a Nephele extension, see the module doc).
pub const POWER_BUTTON_PORT: u16 = 0x602;
/// The GSI of the ACPI Generic Event Device (the power button's event).
pub const GED_IRQ: u32 = 5;
/// i8042 command port.
pub const RESET_PORT: u16 = 0x64;
/// The i8042 "pulse reset line" command.
pub const RESET_VALUE: u8 = 0xfe;
/// PCI reset control register.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_S5: u8 = 5;

/// What the guest asked of the machine by an I/O write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineRequest {
    /// Nothing.
    None,
    /// Power off.
    PowerOff,
    /// Reset (reboot).
    Reset,
}

/// The fixed legacy ports.
#[derive(Debug, Default)]
pub struct LegacyDevices {
    power_button: AtomicBool,
    ged_irq: Option<IrqLine>,
}

impl LegacyDevices {
    /// The ports, raising `ged_irq` when the power button is pressed.
    pub fn new(ged_irq: Option<IrqLine>) -> Self {
        LegacyDevices {
            power_button: AtomicBool::new(false),
            ged_irq,
        }
    }

    /// Whether `port` belongs here.
    pub fn handles(port: u16) -> bool {
        matches!(
            port,
            SLEEP_CONTROL_PORT
                | SLEEP_STATUS_PORT
                | POWER_BUTTON_PORT
                | RESET_PORT
                | 0x60
                | RESET_CONTROL_PORT
        )
    }

    /// Presses the power button (a graceful shutdown request).
    pub fn press_power_button(&self) {
        self.power_button.store(true, Ordering::SeqCst);
        if let Some(irq) = &self.ged_irq
            && let Err(e) = irq.trigger()
        {
            eprintln!("neph-vmm: cannot raise the power button's interrupt: {e}");
        }
    }

    /// Whether the button press has not been acknowledged.
    pub fn power_button_pending(&self) -> bool {
        self.power_button.load(Ordering::SeqCst)
    }

    /// A byte read from `port`.
    pub fn read(&self, port: u16) -> u8 {
        match port {
            POWER_BUTTON_PORT => u8::from(self.power_button.load(Ordering::SeqCst)),
            // i8042 status/data: no keyboard, nothing to read.
            _ => 0,
        }
    }

    /// A byte written to `port`.
    pub fn write(&self, port: u16, value: u8) -> MachineRequest {
        match port {
            SLEEP_CONTROL_PORT if value & SLP_EN != 0 && (value >> 2) & 0x7 == SLP_TYP_S5 => {
                MachineRequest::PowerOff
            }
            POWER_BUTTON_PORT if value & 1 != 0 => {
                self.power_button.store(false, Ordering::SeqCst);
                MachineRequest::None
            }
            RESET_PORT if value == RESET_VALUE => MachineRequest::Reset,
            RESET_CONTROL_PORT if value & 0x4 != 0 => MachineRequest::Reset,
            _ => MachineRequest::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poweroff_reset_and_button() {
        let d = LegacyDevices::default();
        assert_eq!(d.write(SLEEP_CONTROL_PORT, 0x34), MachineRequest::PowerOff);
        assert_eq!(d.write(SLEEP_CONTROL_PORT, 0x14), MachineRequest::None);
        assert_eq!(d.write(RESET_PORT, 0xfe), MachineRequest::Reset);
        assert_eq!(d.write(RESET_PORT, 0xd1), MachineRequest::None);
        assert_eq!(d.write(RESET_CONTROL_PORT, 0x6), MachineRequest::Reset);
        assert_eq!(d.read(POWER_BUTTON_PORT), 0);
        d.press_power_button();
        assert_eq!(d.read(POWER_BUTTON_PORT), 1);
        d.write(POWER_BUTTON_PORT, 1);
        assert!(!d.power_button_pending());
    }
}
