/**
 * Histo-UNet: import the U-Net predictions of step 07 into a QuPath project.
 *
 * Purpose
 *   For the current image, reads <predictions>/<image name>/<image name>.geojson (written
 *   by notebooks/07_infer_slide.ipynb), removes the objects of the same classes that an
 *   earlier import (or a person) left there, adds the predicted regions and saves the
 *   image data. Run it again after a new prediction: it replaces, never duplicates.
 *
 * Requirements
 *   QuPath 0.5 (tested against the 0.5 scripting API: PathIO.readObjects,
 *   removeObjects/addObjects, ProjectImageEntry.saveImageData; 0.4 and 0.6 have the same
 *   calls). A project whose image names are the slide file names used in the work folder
 *   (e.g. 'CMU-1-Small-Region.svs' -> predictions/CMU-1-Small-Region/).
 *
 * Inputs
 *   PREDICTIONS_DIR/<name>/<name>.geojson: a GeoJSON FeatureCollection in full-resolution
 *   pixel coordinates, one feature per connected region per class, with
 *   properties.objectType ('annotation' or 'detection'), properties.classification
 *   {name, color} and properties.measurements (area in um^2, mean class probability).
 *   <name> is the image name without its extension.
 *
 * Outputs
 *   The image's objects in the project: earlier objects of CLASSES_TO_REPLACE removed,
 *   the predicted regions added (holes kept), the image data saved.
 *
 * How to run
 *   In QuPath: Automate > Script editor > open this file > Run (current image) or
 *   Run > Run for project (every image).
 *   Headless:  QuPath script -p project.qpproj -s groovy/import_predictions.groovy
 *              (runs once per image of the project).
 */

import qupath.lib.io.PathIO

// ===================== USER SETTINGS =====================
// Folder of the per-slide prediction folders: absolute, or relative to the project folder.
String PREDICTIONS_DIR = 'predictions'
// Classes whose earlier objects are removed before importing (data/classes.yaml names).
def CLASSES_TO_REPLACE = ['Tumor', 'Stroma', 'Other']
// Also remove earlier objects of these classes that are detections (not only annotations).
boolean REPLACE_DETECTIONS = true
// =================== END USER SETTINGS ===================

def imageData = getCurrentImageData()
def entry = getProjectEntry()
if (imageData == null || entry == null) {
    println 'ERROR: no project image is open; open a project image or run this script for the project'
    return
}
String name = GeneralTools.stripExtension(entry.getImageName())
File base = new File(PREDICTIONS_DIR)
if (!base.isAbsolute()) {
    base = new File(buildFilePath(PROJECT_BASE_DIR, PREDICTIONS_DIR))
}
File geojson = new File(new File(base, name), name + '.geojson')
if (!geojson.isFile()) {
    println "SKIP ${entry.getImageName()}: ${geojson} not found; run 07_infer_slide for this slide or set PREDICTIONS_DIR"
    return
}

def imported = PathIO.readObjects(geojson)
def replace = CLASSES_TO_REPLACE as Set
def unknown = imported.findAll { it.getPathClass() != null && !replace.contains(it.getPathClass().getName()) }
if (!unknown.isEmpty()) {
    def names = unknown.collect { it.getPathClass().getName() }.unique()
    println "WARNING ${name}: classes ${names} are not in CLASSES_TO_REPLACE; earlier objects of them are kept"
}

def hierarchy = imageData.getHierarchy()
def old = hierarchy.getAllObjects(false).findAll { obj ->
    obj.getPathClass() != null && replace.contains(obj.getPathClass().getName()) &&
        (obj.isAnnotation() || (REPLACE_DETECTIONS && obj.isDetection()))
}
hierarchy.removeObjects(old, true)
hierarchy.addObjects(imported)
entry.saveImageData(imageData)

println "Imported ${imported.size()} objects into ${entry.getImageName()} from ${geojson} (removed ${old.size()} earlier ones)"
